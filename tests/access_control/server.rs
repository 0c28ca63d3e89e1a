//! The server under test: kiln in-process on 127.0.0.1:0 or a unix socket,
//! with the security it is given, an embedded castore in a temp dir and a VM
//! runner that refuses to boot anything.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use kiln::auth::Security;
use kiln::castore::Store;
use kiln::executor::{Executor, ExecutorConfig};
use kiln::server::Bound;
use kiln::vmm::{RunningVm, VmRunner, VmSpec, VmmError};

/// A VM runner that never boots anything: these tests must not need VMs.
struct NoVms;

#[async_trait::async_trait]
impl VmRunner for NoVms {
    fn name(&self) -> &'static str {
        "none"
    }
    fn accel(&self) -> &'static str {
        "none"
    }
    async fn start(&self, _spec: &VmSpec) -> Result<Box<dyn RunningVm>, VmmError> {
        Err(VmmError::Unsupported(
            "the access-control tests boot no VM".into(),
        ))
    }
}

/// A running in-process server.
pub struct Server {
    /// `HOST:PORT` (TCP) or the socket path.
    pub addr: String,
    /// The server's castore, to check what calls stored.
    pub store: Store,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
    _data: tempfile::TempDir,
}

impl Server {
    pub async fn start(security: Security) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        Self::start_on(Bound::Tcp(listener), addr, security).await
    }

    pub async fn start_unix(socket: &Path, security: Security) -> Self {
        let listener = tokio::net::UnixListener::bind(socket).unwrap();
        let bound = Bound::Unix(listener, socket.to_owned());
        Self::start_on(bound, socket.display().to_string(), security).await
    }

    /// A server whose castore is scoped by tenant, as `kiln serve` scopes
    /// it when callers authenticate.
    pub async fn start_scoped(security: Security) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let scoping = kiln::castore::scoped::Scoping::by_tenant(
            kiln::castore::scoped::Grants::in_memory().unwrap(),
        );
        Self::start_with(Bound::Tcp(listener), addr, security, scoping).await
    }

    async fn start_on(bound: Bound, addr: String, security: Security) -> Self {
        let scoping = kiln::castore::scoped::Scoping::none();
        Self::start_with(bound, addr, security, scoping).await
    }

    async fn start_with(
        bound: Bound,
        addr: String,
        security: Security,
        scoping: kiln::castore::scoped::Scoping,
    ) -> Self {
        let data = tempfile::tempdir().unwrap();
        let store = kiln::castore::from_addr("", &data.path().join("data"))
            .await
            .unwrap();
        let config = ExecutorConfig {
            data_dir: data.path().join("data"),
            cache_dir: data.path().join("cache"),
            ..Default::default()
        };
        let mut executor = Executor::open(config, store.clone(), Arc::new(NoVms)).unwrap();
        executor.set_scoping(scoping);
        let executor = Arc::new(executor);
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let serve_store = store.clone();
        let task = tokio::spawn(async move {
            kiln::server::serve_with(bound, serve_store, executor, security, async {
                let _ = rx.await;
            })
            .await
            .unwrap();
        });
        Self {
            addr,
            store,
            shutdown: Some(tx),
            task: Some(task),
            _data: data,
        }
    }

    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(10), task)
                .await
                .expect("server stops")
                .expect("server task");
        }
    }
}
