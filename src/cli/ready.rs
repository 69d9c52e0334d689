//! `serve --ready-file`: the addresses the listeners actually got (port 0 picks any free one),
//! written where a supervisor or a test waits for them, only once all of them accept.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

use serde::Serialize;

/// Every listener of a `serve` process, as bound; `None` where the flag is unset.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Bound {
    pub grpc: SocketAddr,
    pub metrics: Option<SocketAddr>,
    pub health: Option<SocketAddr>,
    pub reflection: Option<SocketAddr>,
}

/// Removes a file left by an earlier run, so that the file existing means this run is ready.
pub fn clear(path: &Path) -> anyhow::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(anyhow::anyhow!("--ready-file {}: cannot remove the old file: {e}", path.display()))
        }
        _ => Ok(()),
    }
}

/// Writes `bound` to `path` as one JSON object. The text goes to a temporary file in the same
/// folder first and is renamed over `path`, so a reader sees no file or the whole of it.
pub fn write(path: &Path, bound: &Bound) -> anyhow::Result<()> {
    let failed = |e: &dyn std::fmt::Display| anyhow::anyhow!("--ready-file {}: {e}", path.display());
    let temp = temp_path(path).ok_or_else(|| failed(&"names no file"))?;
    let text = serde_json::to_string(bound).map_err(|e| failed(&e))?;
    std::fs::write(&temp, text + "\n").map_err(|e| failed(&e))?;
    std::fs::rename(&temp, path).map_err(|e| {
        let _ = std::fs::remove_file(&temp);
        failed(&e)
    })
}

/// A name beside `path` (rename is atomic only within one file system) that no other process
/// writing the same ready file uses.
fn temp_path(path: &Path) -> Option<PathBuf> {
    let name = path.file_name()?.to_string_lossy();
    Some(path.with_file_name(format!(".{name}.{}.tmp", std::process::id())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_file_holds_every_address_and_no_temporary_file_is_left() {
        let dir = std::env::temp_dir().join(format!("cc-ready-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ready.json");
        std::fs::write(&path, "stale").unwrap();
        clear(&path).unwrap();
        assert!(!path.exists());
        clear(&path).expect("a missing file is already clear");
        let bound = Bound {
            grpc: "127.0.0.1:41234".parse().unwrap(),
            metrics: Some("[::1]:9090".parse().unwrap()),
            health: None,
            reflection: None,
        };
        write(&path, &bound).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(
            text,
            "{\"grpc\":\"127.0.0.1:41234\",\"metrics\":\"[::1]:9090\",\"health\":null,\"reflection\":null}\n"
        );
        let left: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(left, ["ready.json"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_path_without_a_file_name_is_an_error_not_a_panic() {
        let bound = Bound { grpc: "127.0.0.1:1".parse().unwrap(), metrics: None, health: None, reflection: None };
        let err = write(Path::new("/"), &bound).unwrap_err();
        assert!(err.to_string().contains("--ready-file /: names no file"), "{err}");
    }
}
