//! Helpers shared by the tests that run the `brokerd` binary as a child process: the address it
//! listens on here, and in [`harness`] the process itself and blocking protocol clients.

use std::io::{BufRead, Read};
use std::net::SocketAddr;
use std::time::Duration;

// Each test file uses a different part of it (`binary.rs` none).
#[allow(dead_code)]
pub mod harness;

/// The log filter these tests start `brokerd` with: warnings, plus the server's own lines
/// (listening, shutting down) but not one line per connection.
pub const LOG_FILTER: &str = "warn,brokerd_server::server=info";

/// Reads `brokerd`'s log (its stderr) on a thread of its own and returns the address the broker
/// says it listens on, waiting at most `deadline`.
///
/// Tests start the broker on port 0, so no port is picked before the broker binds it and no
/// other socket can answer in its place. The thread then keeps draining the log so the broker
/// never blocks writing to it.
pub fn listening_addr(log: impl Read + Send + 'static, deadline: Duration) -> SocketAddr {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = std::io::BufReader::new(log).lines();
        for line in lines.by_ref().map_while(Result::ok) {
            if line.contains("brokerd listening") {
                let addr = line
                    .split_whitespace()
                    .find_map(|word| word.strip_prefix("addr="))
                    .and_then(|a| a.parse::<SocketAddr>().ok());
                let _ = tx.send(addr.ok_or(line));
                break;
            }
        }
        for line in lines.map_while(Result::ok) {
            if std::env::var_os("BROKERD_TEST_LOG").is_some() {
                eprintln!("brokerd: {line}");
            }
        }
    });
    match rx.recv_timeout(deadline) {
        Ok(Ok(addr)) => addr,
        Ok(Err(line)) => panic!("no address in brokerd's line {line:?}"),
        Err(e) => panic!("brokerd never said it was listening: {e}"),
    }
}
