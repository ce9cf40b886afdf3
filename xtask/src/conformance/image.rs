//! Container images without a registry: layers (uncompressed tars) in a
//! docker-archive tar (the format `docker save`
//! writes and `ctr images import` reads), tagged with the exact name the
//! e2e framework or kubelet asks for, so pods pulling `IfNotPresent` find
//! it imported.
use std::{
    io::{Read as _, Write as _},
    path::Path,
};

use anyhow::Context as _;
use serde_json::json;
use sha2::{Digest as _, Sha256};

/// What a container of the image runs.
pub struct Image<'a> {
    /// The reference pods name: `registry.k8s.io/pause:3.10.1`.
    pub name: &'a str,
    pub entrypoint: &'a [&'a str],
    pub cmd: &'a [&'a str],
}

/// The files of a layer: each `(path in the image, file on the host,
/// mode)`; directories above each path are created.
pub type Files<'a> = [(&'a str, &'a Path, u32)];

/// Writes a layer tar holding `files` to `out`.
pub fn write_layer(files: &Files, out: &Path) -> anyhow::Result<()> {
    let file = std::fs::File::create(out).with_context(|| format!("{}", out.display()))?;
    let mut layer = tar::Builder::new(std::io::BufWriter::new(file));
    layer.follow_symlinks(false);
    layer.mode(tar::HeaderMode::Deterministic);
    for (path, source, mode) in files {
        let path = path.trim_start_matches('/');
        let parents: Vec<&Path> =
            Path::new(path).ancestors().skip(1).filter(|p| !p.as_os_str().is_empty()).collect();
        for dir in parents.iter().rev() {
            let mut header = tar::Header::new_gnu();
            header.set_entry_type(tar::EntryType::Directory);
            header.set_mode(0o755);
            header.set_size(0);
            layer.append_data(&mut header, dir, std::io::empty())?;
        }
        let mut bytes = Vec::new();
        std::fs::File::open(source)
            .and_then(|mut f| f.read_to_end(&mut bytes))
            .with_context(|| format!("{}", source.display()))?;
        let mut header = tar::Header::new_gnu();
        header.set_mode(*mode);
        header.set_size(bytes.len() as u64);
        layer.append_data(&mut header, path, bytes.as_slice())?;
    }
    layer.into_inner()?.flush()?;
    Ok(())
}

/// Writes the docker archive of `image`, whose layers are the tars at
/// `layers` (bottom first), to `out`.
pub fn write_archive(image: &Image, layers: &[&Path], out: &Path) -> anyhow::Result<()> {
    let mut blobs = Vec::new();
    for layer in layers {
        let bytes = std::fs::read(layer).with_context(|| format!("{}", layer.display()))?;
        blobs.push((hex(&Sha256::digest(&bytes)), bytes));
    }
    let diff_ids: Vec<String> = blobs.iter().map(|(id, _)| format!("sha256:{id}")).collect();
    let config = json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {
            "Entrypoint": image.entrypoint,
            "Cmd": image.cmd,
            "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
        },
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    });
    let config = serde_json::to_vec(&config)?;
    let config_name = format!("{}.json", hex(&Sha256::digest(&config)));
    let layer_names: Vec<String> = blobs.iter().map(|(id, _)| format!("{id}/layer.tar")).collect();
    let manifest = serde_json::to_vec(&json!([{
        "Config": config_name,
        "RepoTags": [image.name],
        "Layers": layer_names,
    }]))?;
    let file = std::fs::File::create(out).with_context(|| format!("{}", out.display()))?;
    let mut archive = tar::Builder::new(std::io::BufWriter::new(file));
    let mut add = |name: &str, bytes: &[u8]| -> std::io::Result<()> {
        let mut header = tar::Header::new_gnu();
        header.set_mode(0o644);
        header.set_size(bytes.len() as u64);
        archive.append_data(&mut header, name, bytes)
    };
    add(&config_name, &config)?;
    for (name, (_, bytes)) in layer_names.iter().zip(&blobs) {
        add(name, bytes)?;
    }
    add("manifest.json", &manifest)?;
    archive.into_inner()?.flush()?;
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The archive names each layer by the digest of its bytes, and the
    /// config lists those digests bottom first: what an importer checks.
    #[test]
    fn an_archive_names_its_layers_by_digest_bottom_first() {
        let dir = std::env::temp_dir().join(format!("xtask-image-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let binary = dir.join("tool");
        std::fs::write(&binary, b"#!/bin/sh\n").unwrap();
        let (bottom, top) = (dir.join("bottom.tar"), dir.join("top.tar"));
        write_layer(&[("usr/bin/tool", &binary, 0o755)], &bottom).unwrap();
        write_layer(&[("tool", &binary, 0o755)], &top).unwrap();
        let image = Image { name: "registry.k8s.io/x:1", entrypoint: &["/tool"], cmd: &["run"] };
        let archive = dir.join("x.tar");
        write_archive(&image, &[&bottom, &top], &archive).unwrap();

        let mut entries = std::collections::BTreeMap::new();
        let mut reader = tar::Archive::new(std::fs::File::open(&archive).unwrap());
        for entry in reader.entries().unwrap() {
            let mut entry = entry.unwrap();
            let mut bytes = Vec::new();
            entry.read_to_end(&mut bytes).unwrap();
            entries.insert(entry.path().unwrap().to_string_lossy().into_owned(), bytes);
        }
        let manifest: serde_json::Value =
            serde_json::from_slice(&entries["manifest.json"]).unwrap();
        assert_eq!(manifest[0]["RepoTags"][0], "registry.k8s.io/x:1");
        let layers: Vec<&str> =
            manifest[0]["Layers"].as_array().unwrap().iter().map(|l| l.as_str().unwrap()).collect();
        let digest = |path: &Path| hex(&Sha256::digest(std::fs::read(path).unwrap()));
        assert_eq!(
            layers,
            [format!("{}/layer.tar", digest(&bottom)), format!("{}/layer.tar", digest(&top))]
        );
        let config_name = manifest[0]["Config"].as_str().unwrap();
        let config = &entries[config_name];
        assert_eq!(config_name, format!("{}.json", hex(&Sha256::digest(config))));
        let config: serde_json::Value = serde_json::from_slice(config).unwrap();
        assert_eq!(
            config["rootfs"]["diff_ids"],
            json!([format!("sha256:{}", digest(&bottom)), format!("sha256:{}", digest(&top))])
        );
        assert_eq!(config["config"]["Entrypoint"], json!(["/tool"]));
        // The layer holds the file with its directories and mode.
        let mut layer = tar::Archive::new(std::fs::File::open(&bottom).unwrap());
        let listed: Vec<(String, u32)> = layer
            .entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (e.path().unwrap().to_string_lossy().into_owned(), e.header().mode().unwrap())
            })
            .collect();
        assert_eq!(
            listed,
            [("usr".into(), 0o755), ("usr/bin".into(), 0o755), ("usr/bin/tool".into(), 0o755)]
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
