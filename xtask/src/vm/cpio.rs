//! A minimal writer for the cpio "newc" format the kernel unpacks as an
//! initramfs.
use std::io::{self, Write};

pub struct Cpio<W: Write> {
    out: W,
    inode: u32,
}

const DIR: u32 = 0o040_755;
const FILE_EXEC: u32 = 0o100_755;
const FILE: u32 = 0o100_644;
const SYMLINK: u32 = 0o120_777;

impl<W: Write> Cpio<W> {
    pub fn new(out: W) -> Self {
        Self { out, inode: 1 }
    }

    fn entry(&mut self, name: &str, mode: u32, data: &[u8]) -> io::Result<()> {
        let name = name.trim_start_matches('/');
        let name_len = name.len() + 1;
        let header = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            self.inode,
            mode,
            0, // uid
            0, // gid
            1, // nlink
            0, // mtime
            data.len(),
            0, // dev major
            0, // dev minor
            0, // rdev major
            0, // rdev minor
            name_len,
            0, // check
        );
        self.inode += 1;
        self.out.write_all(header.as_bytes())?;
        self.out.write_all(name.as_bytes())?;
        self.out.write_all(&[0])?;
        self.pad(110 + name_len)?;
        self.out.write_all(data)?;
        self.pad(data.len())
    }

    fn pad(&mut self, len: usize) -> io::Result<()> {
        let padding = (4 - len % 4) % 4;
        self.out.write_all(&[0u8; 3][..padding])
    }

    pub fn dir(&mut self, name: &str) -> io::Result<()> {
        self.entry(name, DIR, &[])
    }

    pub fn file(&mut self, name: &str, data: &[u8], executable: bool) -> io::Result<()> {
        self.entry(name, if executable { FILE_EXEC } else { FILE }, data)
    }

    pub fn symlink(&mut self, name: &str, target: &str) -> io::Result<()> {
        self.entry(name, SYMLINK, target.as_bytes())
    }

    pub fn finish(mut self) -> io::Result<W> {
        self.entry("TRAILER!!!", 0, &[])?;
        Ok(self.out)
    }
}

#[cfg(test)]
mod tests {
    use super::Cpio;

    /// Parses newc entries back: (name, mode, data).
    fn entries(bytes: &[u8]) -> Vec<(String, u32, Vec<u8>)> {
        let mut out = Vec::new();
        let mut at = 0;
        let field = |b: &[u8], i: usize| {
            u32::from_str_radix(std::str::from_utf8(&b[6 + i * 8..14 + i * 8]).unwrap(), 16)
                .unwrap()
        };
        while at < bytes.len() {
            let h = &bytes[at..at + 110];
            assert_eq!(&h[..6], b"070701");
            let (mode, size, name_len) = (field(h, 1), field(h, 6) as usize, field(h, 11) as usize);
            let name =
                String::from_utf8(bytes[at + 110..at + 110 + name_len - 1].to_vec()).unwrap();
            let data_at = (at + 110 + name_len).next_multiple_of(4);
            out.push((name.clone(), mode, bytes[data_at..data_at + size].to_vec()));
            at = (data_at + size).next_multiple_of(4);
            if name == "TRAILER!!!" {
                break;
            }
        }
        out
    }

    #[test]
    fn newc_round_trip() {
        let mut cpio = Cpio::new(Vec::new());
        cpio.dir("/usr").unwrap();
        cpio.file("/usr/x", b"hello", true).unwrap();
        cpio.symlink("/var/run", "/run").unwrap();
        let bytes = cpio.finish().unwrap();
        assert_eq!(bytes.len() % 4, 0);
        let e = entries(&bytes);
        assert_eq!(e[0], ("usr".into(), 0o040_755, vec![]));
        assert_eq!(e[1], ("usr/x".into(), 0o100_755, b"hello".to_vec()));
        assert_eq!(e[2], ("var/run".into(), 0o120_777, b"/run".to_vec()));
        assert_eq!(e[3].0, "TRAILER!!!");
    }
}
