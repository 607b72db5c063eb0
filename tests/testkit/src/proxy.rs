//! A TCP proxy whose target can be switched or cut, for outages and vehicles that
//! move between gateways.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Forwards connections on a loopback port to a target; stops on drop.
pub struct SwitchProxy {
    /// The proxy's address.
    pub addr: SocketAddr,
    target: Arc<Mutex<Option<SocketAddr>>>,
    generation: watch::Sender<u64>,
    task: JoinHandle<()>,
}

impl SwitchProxy {
    /// Starts forwarding to `target`.
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("binding the proxy");
        let addr = listener.local_addr().expect("proxy address");
        let target = Arc::new(Mutex::new(Some(target)));
        let (generation, _) = watch::channel(0u64);
        let (t, g) = (target.clone(), generation.clone());
        let task = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let to = t.lock().ok().and_then(|t| *t);
                let mut cut = g.subscribe();
                tokio::spawn(async move {
                    let Some(to) = to else { return };
                    let Ok(mut server) = TcpStream::connect(to).await else { return };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = cut.changed() => {}
                    }
                });
            }
        });
        Self { addr, target, generation, task }
    }

    /// New connections go to `target` (`None`: refused); existing ones are cut.
    pub fn switch(&self, target: Option<SocketAddr>) {
        if let Ok(mut t) = self.target.lock() {
            *t = target;
        }
        self.generation.send_modify(|g| *g += 1);
    }
}

impl Drop for SwitchProxy {
    fn drop(&mut self) {
        self.task.abort();
        self.generation.send_modify(|g| *g += 1);
    }
}
