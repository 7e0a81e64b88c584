//! What a sim host's container downloads, served from the test side of its link: a model host and GitHub's
//! archive endpoint are to a real container (the sims reach neither the internet nor each other), and the
//! installation part of an llmctl.toml that several test files share.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};

/// A minimal static file server: `http://<addr>:<port>/<file>` from `dir`, one thread per connection, for the
/// life of the test process.
pub struct FileServer {
    pub port: u16,
}

impl FileServer {
    pub fn start(addr: &str, dir: PathBuf) -> FileServer {
        let listener = TcpListener::bind((addr, 0)).expect("bind the file server");
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let dir = dir.clone();
                std::thread::spawn(move || serve(conn, &dir));
            }
        });
        FileServer { port }
    }
}

fn serve(mut conn: TcpStream, dir: &Path) {
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut request = String::new();
    if reader.read_line(&mut request).is_err() {
        return;
    }
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
            break;
        }
    }
    let path = request.split_whitespace().nth(1).unwrap_or("/");
    match std::fs::read(dir.join(path.trim_start_matches('/'))) {
        Ok(data) if !path.contains("..") => {
            let _ = write!(
                conn,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nContent-Type: application/octet-stream\r\n\
                 Connection: close\r\n\r\n",
                data.len()
            );
            let _ = conn.write_all(&data);
        }
        _ => {
            let _ = write!(
                conn,
                "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
        }
    }
}

/// The sections of an llmctl.toml that describe a whole installation (driver, llama.cpp, the test model, the
/// server and the proxy), for runs that plan or check it on sims whose containers already hold that model.
pub fn installation() -> String {
    let sha = std::env::var("LLMCTL_TEST_MODEL").map_or_else(
        |_| super::law::MODEL_SHA256.to_string(),
        |m| super::law::sha256_hex(Path::new(&m)),
    );
    format!(
        r#"[driver]
version = "595.71.05"
flavor = "open"

[llama_cpp]
git_ref = "b11434"

[model]
source = "https://huggingface.co/bartowski/SmolLM2-135M-Instruct-GGUF/resolve/main/SmolLM2-135M-Instruct-Q4_K_M.gguf"
sha256 = "{sha}"
dest = "/models/model.gguf"

[server]
context = 32768
port = 8080

[proxy]
listen = "0.0.0.0:4000"
"#
    )
}
