//! Reading the small text files segsync is given (config, rules, rule tests, key files) so that
//! no read can block or exhaust memory: a file is opened without blocking, refused unless it is
//! a regular file (a FIFO, socket or device would wait for a writer forever), and read up to a
//! size cap. Every file segsync reads goes through [`read_text`].

use std::io::{self, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// The largest file read: rules, configs and keys are a few KB.
pub const MAX_FILE_BYTES: u64 = 4 * 1024 * 1024;

/// Whether `path` is (or links to) a regular file; anything else is never opened.
pub fn is_regular(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file())
}

/// The file's text, or an error that says why it was not read.
pub fn read_text(path: &Path) -> io::Result<String> {
    // O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer.
    let file = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(path)?;
    // Checked on the opened file itself, so a file swapped for a FIFO after a look is still caught.
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "not a regular file (a FIFO, socket or device); segsync reads regular files only",
        ));
    }
    if meta.len() > MAX_FILE_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{} bytes, more than the {MAX_FILE_BYTES} a segsync file may have", meta.len()),
        ));
    }
    let mut text = String::new();
    file.take(MAX_FILE_BYTES + 1).read_to_string(&mut text)?;
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    // A FIFO is refused at once instead of blocking; a regular file reads.
    #[test]
    fn fifos_are_refused_without_blocking() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fifo = dir.path().join("zz.rhai");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status().expect("mkfifo runs");
        assert!(made.success());
        assert!(!is_regular(&fifo));
        let err = read_text(&fifo).expect_err("a FIFO is not read");
        assert!(err.to_string().contains("not a regular file"), "{err}");
        let file = dir.path().join("a.rhai");
        std::fs::write(&file, "const LIST = \"x\";").expect("write");
        assert_eq!(read_text(&file).expect("reads"), "const LIST = \"x\";");
    }
}
