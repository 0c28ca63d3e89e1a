//! `kiln serve` as a child process in a [`NetLab`]'s host namespace,
//! listening on a unix socket, and what the network tests do with it:
//! ingest the toolset, build over `snix.build.v1`, read outputs, check
//! what a build left behind.

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use kiln::castore::{Node, Store, WireNode};
use kiln::proto::{snix_build, snix_castore};
use tonic::transport::Channel;
use tonic::Status;

use super::{processes_in, NetLab, START_LIMIT};
use crate::harness::fixtures::BUSYBOX;
use crate::harness::procs::{build_leftovers, leftovers};

/// How long one build may take before the test calls it hung.
pub const BUILD_LIMIT: Duration = Duration::from_secs(300);

/// A running `kiln serve`; killed on drop (its children die with it, and
/// the lab kills whatever is left in its namespace).
pub struct Kiln<'lab> {
    lab: &'lab NetLab,
    child: Child,
    dir: PathBuf,
    /// The unix socket it listens on.
    pub socket: PathBuf,
    /// Its `--data-dir`.
    pub data_dir: PathBuf,
}

impl<'lab> Kiln<'lab> {
    /// Starts `kiln serve --listen unix:DIR/kiln.sock --data-dir DIR/data
    /// ARGS…` in the lab's host namespace and waits for its socket.
    pub(super) fn start(lab: &'lab NetLab, dir: &Path, args: &[&str]) -> Kiln<'lab> {
        std::fs::create_dir_all(dir).unwrap();
        let socket = dir.join("kiln.sock");
        let data_dir = dir.join("data");
        let log = std::fs::File::create(dir.join("server.log")).unwrap();
        let mut argv: Vec<std::ffi::OsString> = vec![
            env!("CARGO_BIN_EXE_kiln").into(),
            "serve".into(),
            "--listen".into(),
            format!("unix:{}", socket.display()).into(),
            "--data-dir".into(),
            data_dir.clone().into(),
            // stop() waits at most 60 s for the clean-up.
            "--shutdown-grace".into(),
            "5".into(),
        ];
        argv.extend(args.iter().map(Into::into));
        let child = lab
            .netns_exec(&lab.host, &argv)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut kiln = Kiln {
            lab,
            child,
            dir: dir.to_owned(),
            socket,
            data_dir,
        };
        let deadline = Instant::now() + START_LIMIT;
        while !kiln.socket.exists() {
            if let Some(status) = kiln.child.try_wait().unwrap() {
                panic!("kiln serve {args:?} exited ({status}):\n{}", kiln.log());
            }
            assert!(
                Instant::now() < deadline,
                "kiln serve did not listen within {START_LIMIT:?}:\n{}",
                kiln.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(
            processes_in(lab.host_inode()).contains(&(kiln.child.id() as i32)),
            "kiln serve does not run in the lab's namespace {}",
            lab.host
        );
        kiln
    }

    /// `unix:PATH`, its address.
    pub fn addr(&self) -> String {
        format!("unix:{}", self.socket.display())
    }

    /// What it logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }

    /// Its builds' directories.
    pub fn runs(&self) -> PathBuf {
        self.data_dir.join("runs")
    }

    /// A gRPC channel to it.
    pub async fn channel(&self) -> Channel {
        kiln::cli::connect(&self.addr()).await.unwrap()
    }

    /// Its castore, over gRPC.
    pub async fn store(&self) -> Store {
        kiln::castore::from_addr(&format!("grpc+unix:{}", self.socket.display()), &self.dir)
            .await
            .unwrap()
    }

    /// Whether its health service answers SERVING within 10 s.
    pub async fn healthy(&self) -> bool {
        use tonic_health::pb::health_check_response::ServingStatus;
        use tonic_health::pb::{health_client::HealthClient, HealthCheckRequest};
        let mut client = HealthClient::new(self.channel().await);
        let check = client.check(HealthCheckRequest {
            service: String::new(),
        });
        match tokio::time::timeout(Duration::from_secs(10), check).await {
            Ok(Ok(answer)) => answer.into_inner().status == ServingStatus::Serving as i32,
            _ => false,
        }
    }

    /// Ingests the busybox toolset into its castore, as the entry
    /// [`BUSYBOX`] that `nix_request` takes.
    pub async fn busybox(&self) -> snix_castore::Entry {
        let tmp = tempfile::tempdir().unwrap();
        let node = crate::harness::server::ingest_busybox(&self.store().await, tmp.path()).await;
        node.to_snix_entry(BUSYBOX.as_bytes())
    }

    /// `DoBuild`, answered within [`BUILD_LIMIT`] (or the test fails: the
    /// build hung).
    pub async fn build(
        &self,
        req: snix_build::BuildRequest,
    ) -> Result<snix_build::BuildResponse, Status> {
        let mut client =
            snix_build::build_service_client::BuildServiceClient::new(self.channel().await);
        match tokio::time::timeout(BUILD_LIMIT, client.do_build(req)).await {
            Ok(answer) => answer.map(tonic::Response::into_inner),
            Err(_) => panic!(
                "no answer to the build within {BUILD_LIMIT:?}:\n{}",
                self.log()
            ),
        }
    }

    /// Builds `req`, which must succeed, and returns the bytes of its
    /// outputs, which must be files.
    pub async fn build_files(&self, req: snix_build::BuildRequest) -> Vec<Vec<u8>> {
        let response = match self.build(req).await {
            Ok(r) => r,
            Err(status) => panic!("the build failed: {}", self.describe(&status)),
        };
        let mut files = Vec::new();
        for output in &response.outputs {
            files.push(self.read_file(output.output.as_ref().unwrap()).await);
        }
        files
    }

    /// Reads a file output's bytes.
    pub async fn read_file(&self, entry: &snix_castore::Entry) -> Vec<u8> {
        use tokio::io::AsyncReadExt;
        let Node::File { digest, .. } = entry.clone().try_into_anonymous().unwrap() else {
            panic!("expected a file output, got {entry:?}");
        };
        let mut r = self
            .store()
            .await
            .blobs
            .open_read(&digest)
            .await
            .unwrap()
            .unwrap();
        let mut out = Vec::new();
        r.reader.read_to_end(&mut out).await.unwrap();
        out
    }

    /// A failed build's status, its `kiln.v1.Failed` detail (with the log
    /// tail) and the server's log, for a failure message.
    pub fn describe(&self, status: &Status) -> String {
        let detail = kiln::grpc::status::failed_detail(status).map(|f| {
            format!(
                "kind {}, exit {:?}, log tail:\n{}",
                f.kind,
                f.exit_code,
                String::from_utf8_lossy(&f.log_tail)
            )
        });
        format!(
            "{:?}: {}\n{}\nserver log:\n{}",
            status.code(),
            status.message(),
            detail.unwrap_or_default(),
            self.log()
        )
    }

    /// Waits (at most 20 s) until no build directory, no process naming
    /// one and no passt in the lab's host namespace is left, else fails
    /// naming them.
    pub async fn assert_nothing_left(&self) {
        let left = || {
            let mut left = build_leftovers(&self.runs());
            left.extend(
                self.lab
                    .passt_processes()
                    .into_iter()
                    .map(|pid| format!("passt {pid}: {}", super::cmdline(pid))),
            );
            left
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !left().is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let left = left();
        assert!(
            left.is_empty(),
            "left behind: {left:#?}\nserver log:\n{}",
            self.log()
        );
    }

    /// Stops it as an operator would (SIGTERM), waiting for its clean-up;
    /// SIGKILL after 60 s.
    pub fn stop(mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.child.try_wait().unwrap().is_none() {
            if Instant::now() >= deadline {
                panic!("kiln serve did not stop on SIGTERM:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        // Its warm pool went with it.
        let left = leftovers(&self.runs());
        assert!(
            left.is_empty(),
            "left behind after SIGTERM: {left:?}\n{}",
            self.log()
        );
    }
}

impl Drop for Kiln<'_> {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
