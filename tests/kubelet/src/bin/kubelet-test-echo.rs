//! Test workload for the process kubelet's smoke test.
//!
//! `kubelet-test-echo [--port N] [--file PATH] [ARGS...]` prints its args, environment and the
//! content of `--file` at start, then serves HTTP on `$PARTNERGATE_BIND_IP:N` (default 8080):
//! `/readyz` and `/healthz` (200), `/args`, `/env`, `/file` (current content of `--file`),
//! `/say/WORD` (prints `said WORD` on stdout and `warned WORD` on stderr, for `kubectl logs`),
//! `/exit?code=N` (exits with N, to test restarts). On SIGTERM it prints `got SIGTERM` on stdout
//! and exits 0 (the last line `kubectl logs -f` must still deliver when the pod is deleted).

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::{TcpListener, TcpStream};

fn respond(mut s: TcpStream, code: u16, body: &str) {
    let reason = match code {
        200 => "OK",
        404 => "Not Found",
        _ => "Error",
    };
    let _ = write!(
        s,
        "HTTP/1.1 {code} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
}

extern "C" fn on_sigterm(_: libc::c_int) {
    const MSG: &[u8] = b"got SIGTERM\n";
    // SAFETY: write(2) and _exit(2) are async-signal-safe; MSG is a static buffer.
    unsafe {
        libc::write(1, MSG.as_ptr().cast(), MSG.len());
        libc::_exit(0);
    }
}

fn main() {
    // SAFETY: installs a handler that only calls async-signal-safe functions.
    unsafe {
        libc::signal(
            libc::SIGTERM,
            on_sigterm as extern "C" fn(libc::c_int) as libc::sighandler_t,
        );
    }
    let argv: Vec<String> = std::env::args().skip(1).collect();
    let mut port = 8080u16;
    let mut file: Option<String> = None;
    let mut i = 0;
    while i < argv.len() {
        match argv[i].as_str() {
            "--port" => {
                port = argv.get(i + 1).and_then(|p| p.parse().ok()).unwrap_or(8080);
                i += 1;
            }
            "--file" => {
                file = argv.get(i + 1).cloned();
                i += 1;
            }
            a => {
                if let Some(v) = a.strip_prefix("--file=") {
                    file = Some(v.to_string());
                }
            }
        }
        i += 1;
    }
    let mut env: Vec<(String, String)> = std::env::vars().collect();
    env.sort();
    let env_text: String = env.iter().map(|(k, v)| format!("{k}={v}\n")).collect();
    let args_text: String = argv.iter().map(|a| format!("{a}\n")).collect();
    println!("args:\n{args_text}env:\n{env_text}");
    if let Some(f) = &file {
        match std::fs::read_to_string(f) {
            Ok(c) => println!("file {f}:\n{c}"),
            Err(e) => println!("file {f}: {e}"),
        }
    }
    let ip = std::env::var("PARTNERGATE_BIND_IP").unwrap_or_else(|_| "127.0.0.1".to_string());
    let listener = match TcpListener::bind((ip.as_str(), port)) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("bind {ip}:{port}: {e}");
            std::process::exit(1);
        }
    };
    println!("listening on {ip}:{port}");
    for conn in listener.incoming() {
        let Ok(stream) = conn else { continue };
        let Ok(read_half) = stream.try_clone() else {
            continue;
        };
        let mut line = String::new();
        if BufReader::new(read_half).read_line(&mut line).is_err() {
            continue;
        }
        let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
        match path.as_str() {
            "/readyz" | "/healthz" => respond(stream, 200, "ok\n"),
            "/args" => respond(stream, 200, &args_text),
            "/env" => respond(stream, 200, &env_text),
            "/file" => match file.as_deref().map(std::fs::read_to_string) {
                Some(Ok(c)) => respond(stream, 200, &c),
                Some(Err(e)) => respond(stream, 500, &format!("{e}\n")),
                None => respond(stream, 404, "no --file\n"),
            },
            // One line on each stream, for the `kubectl logs` checks of smoke.sh.
            p if p.starts_with("/say/") => {
                let word = &p["/say/".len()..];
                println!("said {word}");
                eprintln!("warned {word}");
                respond(stream, 200, "said\n");
            }
            p if p.starts_with("/exit") => {
                let code = p
                    .split("code=")
                    .nth(1)
                    .and_then(|c| c.parse().ok())
                    .unwrap_or(3);
                respond(stream, 200, "bye\n");
                println!("exiting with {code} on request");
                std::process::exit(code);
            }
            _ => respond(stream, 404, "not found\n"),
        }
    }
}
