//! Rebuild the programs when bpf-linker changes: it is the linker, but cargo
//! does not know that.
fn main() {
    if let Ok(linker) = which::which("bpf-linker") {
        println!("cargo:rerun-if-changed={}", linker.display());
    }
}
