//! `caption-cascade serve` processes of the binary under test. Each binds every listener to port
//! 0 and names the ports it got in its `--ready-file`, which is waited for: no port is ever picked
//! here and handed over, so servers started at once cannot be given the same one. Each process's
//! stderr goes to a file, shown when it fails to start or its test fails; it is killed when dropped.

use std::{
    net::SocketAddr,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, Instant},
};

/// Long enough for both models to load with every core busy; a server that fails exits sooner.
const READY_WITHIN: Duration = Duration::from_secs(240);
/// How much of a server's stderr a failure shows.
const TAIL_BYTES: usize = 6000;

/// The addresses a server's listeners were bound to, as its ready file names them.
#[derive(Debug, Clone, Copy, serde::Deserialize)]
pub struct Bound {
    pub grpc: SocketAddr,
    pub metrics: Option<SocketAddr>,
    pub health: Option<SocketAddr>,
    pub reflection: Option<SocketAddr>,
}

/// How to start a server: `serve --device cpu --listen 127.0.0.1:0 ARGS…` from the repository
/// root, with its ready file and stderr in a folder of its own.
pub struct ServerCommand {
    listen: String,
    args: Vec<String>,
    env: Vec<(String, Option<String>)>,
    wrapper: Vec<String>,
}

/// A server with `args` after the harness's own flags.
pub fn server(args: &[&str]) -> ServerCommand {
    ServerCommand {
        listen: "127.0.0.1:0".into(),
        args: args.iter().map(|a| a.to_string()).collect(),
        env: Vec::new(),
        wrapper: Vec::new(),
    }
}

/// Starts `serve --device cpu ARGS…` on a port of its own with `env` set, once it is ready.
pub async fn spawn_server(args: &[&str], env: &[(&str, &str)]) -> ServerProcess {
    env.iter().fold(server(args), |cmd, (k, v)| cmd.env(k, v)).start().await
}

impl ServerCommand {
    /// Prometheus metrics on a loopback port of their own.
    pub fn metrics(self) -> Self {
        self.args(&["--metrics-listen", "127.0.0.1:0"])
    }

    /// The plaintext health listener on a loopback port of its own.
    pub fn health(self) -> Self {
        self.args(&["--health-listen", "127.0.0.1:0"])
    }

    /// Reflection on a loopback port of its own.
    pub fn reflection(self) -> Self {
        self.args(&["--reflection-listen", "127.0.0.1:0"])
    }

    pub fn args(mut self, args: &[&str]) -> Self {
        self.args.extend(args.iter().map(|a| a.to_string()));
        self
    }

    /// The gRPC listener's address instead of 127.0.0.1:0.
    pub fn listen(mut self, addr: &str) -> Self {
        self.listen = addr.into();
        self
    }

    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.into(), Some(value.into())));
        self
    }

    pub fn env_remove(mut self, key: &str) -> Self {
        self.env.push((key.into(), None));
        self
    }

    /// Runs the server as `PROGRAM ARGS… caption-cascade serve …`: `program` must exec it (as
    /// `prlimit` does), so the child's id is the server's.
    pub fn wrapped_in(mut self, program: &[&str]) -> Self {
        self.wrapper = program.iter().map(|a| a.to_string()).collect();
        self
    }

    /// Starts the process; [`Starting::ready`] waits for its listeners.
    pub fn spawn(self) -> Starting {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::SeqCst);
        let dir = std::env::temp_dir().join(format!("cc-serve-{}-{n}", std::process::id()));
        // Left behind by an earlier process that had this id and was killed.
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let ready_file = dir.join("ready.json");
        let stderr = dir.join("stderr");
        let binary = env!("CARGO_BIN_EXE_caption-cascade").to_string();
        let program: Vec<&String> = self.wrapper.iter().chain([&binary]).collect();
        let mut cmd = Command::new(program[0]);
        cmd.args(&program[1..])
            .args(["serve", "--device", "cpu", "--listen", &self.listen, "--ready-file"])
            .arg(&ready_file)
            .args(&self.args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).unwrap());
        for (key, value) in &self.env {
            match value {
                Some(value) => cmd.env(key, value),
                None => cmd.env_remove(key),
            };
        }
        let child = cmd.spawn().unwrap_or_else(|e| panic!("start {}: {e}", program[0]));
        Starting(Owned { child, dir, ready_file, stderr })
    }

    /// Starts the process and waits until it is ready.
    pub async fn start(self) -> ServerProcess {
        self.spawn().ready().await
    }
}

/// A server process not yet known to be listening.
pub struct Starting(Owned);

impl Starting {
    /// Waits for the ready file (polled; it is written whole, so it parses once it exists). Fails
    /// the test with the exit status and the end of stderr if the server exits first.
    pub async fn ready(mut self) -> ServerProcess {
        let start = Instant::now();
        loop {
            if let Ok(text) = std::fs::read_to_string(&self.0.ready_file) {
                let bound = serde_json::from_str(&text).unwrap_or_else(|e| {
                    panic!("the ready file {} is not whole: {e}: {text:?}", self.0.ready_file.display())
                });
                return ServerProcess { process: self.0, bound };
            }
            if let Some(status) = self.0.child.try_wait().unwrap() {
                panic!("the server exited ({status}) before it was ready; its stderr ends:\n{}", self.0.stderr_tail());
            }
            assert!(
                start.elapsed() < READY_WITHIN,
                "the server was not ready within {READY_WITHIN:?}; its stderr ends:\n{}",
                self.0.stderr_tail()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn id(&self) -> u32 {
        self.0.child.id()
    }
}

/// A server process that is listening on the addresses in `bound`.
pub struct ServerProcess {
    process: Owned,
    pub bound: Bound,
}

impl ServerProcess {
    /// The gRPC listener's address.
    pub fn addr(&self) -> SocketAddr {
        self.bound.grpc
    }

    pub fn metrics(&self) -> SocketAddr {
        self.bound.metrics.expect("the server was started without .metrics()")
    }

    pub fn health(&self) -> SocketAddr {
        self.bound.health.expect("the server was started without .health()")
    }

    pub fn reflection(&self) -> SocketAddr {
        self.bound.reflection.expect("the server was started without .reflection()")
    }

    pub fn id(&self) -> u32 {
        self.process.child.id()
    }

    pub fn child(&mut self) -> &mut Child {
        &mut self.process.child
    }

    /// What the server has written to stderr (its log) so far.
    pub fn log(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.process.stderr).unwrap_or_default()).into_owned()
    }

    pub fn kill(&mut self) {
        let _ = self.process.child.kill();
        let _ = self.process.child.wait();
    }
}

/// The child and its folder: the process is killed and the folder removed when dropped.
struct Owned {
    child: Child,
    dir: PathBuf,
    ready_file: PathBuf,
    stderr: PathBuf,
}

impl Owned {
    fn stderr_tail(&self) -> String {
        let text = std::fs::read(&self.stderr).unwrap_or_default();
        String::from_utf8_lossy(&text[text.len().saturating_sub(TAIL_BYTES)..]).into_owned()
    }
}

impl Drop for Owned {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- stderr of server {} (its end) ---\n{}", self.child.id(), self.stderr_tail());
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
