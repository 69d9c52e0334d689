//! Files a running server reads again when their content changes (TLS certificates and keys,
//! bearer-token files), so that a renewal or a rotation needs no restart; and, in [`tokens`], the
//! format of a token file.

pub mod tokens;

use std::{
    io,
    path::PathBuf,
    time::{Duration, Instant},
};

use sha2::{Digest, Sha256};

/// How often watched files are looked at again by default (`--file-recheck-ms`).
pub const RECHECK: Duration = Duration::from_secs(1);

/// What each watched file holds, in the order they were named: its bytes, or why it could not be
/// read (a deleted file among them).
pub type Contents = Vec<io::Result<Vec<u8>>>;

/// Some files and what they held when last read. It is polled by whoever uses the files, when
/// they are used, so an idle server reads nothing; the files are small and read at most once per
/// interval.
#[derive(Debug)]
pub struct FileWatch {
    paths: Vec<PathBuf>,
    every: Duration,
    seen: [u8; 32],
    checked: Instant,
}

impl FileWatch {
    /// Starts watching `paths`, looked at again at most once per `every`; with what they hold now.
    pub fn new(paths: Vec<PathBuf>, every: Duration) -> (Self, Contents) {
        let contents = read(&paths);
        let watch = Self { seen: digest(&contents), paths, every, checked: Instant::now() };
        (watch, contents)
    }

    /// What the files hold, when it is time to look again and that differs from what was last
    /// seen; each change is reported once, whether its user can use it or not.
    pub fn changed(&mut self) -> Option<Contents> {
        if self.checked.elapsed() < self.every {
            return None;
        }
        self.checked = Instant::now();
        let contents = read(&self.paths);
        let now = digest(&contents);
        // Contents, not modification times: this also sees a Kubernetes Secret's symlink swap
        // and two edits within one timestamp tick.
        (now != self.seen).then(|| {
            self.seen = now;
            contents
        })
    }
}

fn read(paths: &[PathBuf]) -> Contents {
    paths.iter().map(std::fs::read).collect()
}

fn digest(contents: &Contents) -> [u8; 32] {
    let mut hash = Sha256::new();
    for file in contents {
        match file {
            // Length-prefixed, so no two lists of files hash alike.
            Ok(bytes) => {
                hash.update([1]);
                hash.update((bytes.len() as u64).to_le_bytes());
                hash.update(bytes);
            }
            Err(_) => hash.update([0]),
        }
    }
    hash.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_of_content_is_reported_once_and_not_before_the_interval() {
        let dir = std::env::temp_dir().join(format!("cc-watch-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("file");
        std::fs::write(&path, "one").unwrap();
        let (mut watch, first) = FileWatch::new(vec![path.clone()], Duration::ZERO);
        assert_eq!(first[0].as_deref().unwrap(), b"one");
        assert!(watch.changed().is_none(), "nothing changed");
        std::fs::write(&path, "two").unwrap();
        assert_eq!(watch.changed().unwrap()[0].as_deref().unwrap(), b"two");
        assert!(watch.changed().is_none(), "a change is reported once");
        std::fs::remove_file(&path).unwrap();
        assert!(watch.changed().unwrap()[0].is_err(), "a deleted file is a change");
        std::fs::write(&path, "").unwrap();
        assert!(watch.changed().unwrap()[0].as_deref().unwrap().is_empty(), "an empty file is not a missing one");

        let (mut slow, _) = FileWatch::new(vec![path.clone()], Duration::from_secs(3600));
        std::fs::write(&path, "three").unwrap();
        assert!(slow.changed().is_none(), "looked at again before its interval");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
