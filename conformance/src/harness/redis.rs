//! `redis-server`: one node, or N independent nodes for Redlock.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tempfile::TempDir;

use super::process::{
    Launch, ServerProcess, ask, find_binary, on_free_ports, temp_dir, wipe, write_file,
};
use super::{HarnessError, Result, Server};

const READY_WITHIN: Duration = Duration::from_secs(10);

/// Whether a Redis server keeps its data across restarts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RedisPersistence {
    /// No snapshots, no append-only file: every restart starts empty.
    #[default]
    None,
    /// An append-only file (`appendfsync everysec`): a restart with `keep_data`
    /// keeps every acknowledged write.
    AppendOnly,
}

/// Whether a TLS server asks clients for a certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsClients {
    /// `tls-auth-clients optional`: a client may present a certificate.
    Optional,
    /// `tls-auth-clients yes`: a client must present a certificate signed by the CA.
    Required,
}

/// The TLS side of a [`RedisServer`] started with [`RedisServer::start_tls`]: its port
/// and the PEM files made for it (a test CA, the server's certificate for
/// `127.0.0.1`/`localhost`, and a client certificate signed by the same CA).
#[derive(Clone, Debug)]
pub struct RedisTlsFiles {
    /// The TLS port (the plain port stays open on loopback for operators).
    pub port: u16,
    /// The test CA's certificate.
    pub ca: PathBuf,
    /// A client certificate signed by the CA.
    pub client_cert: PathBuf,
    /// Its key.
    pub client_key: PathBuf,
    /// A CA that signed nothing here, to test refusals.
    pub other_ca: PathBuf,
}

/// A `redis-server` on `127.0.0.1`, stopped on drop.
///
/// Started as `redis-server --port P --bind 127.0.0.1 --dir <tmp>/data --save ""
/// --appendonly yes|no --appendfsync everysec --protected-mode no
/// --enable-debug-command local` (so tests may use `DEBUG SLEEP`), plus `--tls-port`
/// and certificates when started with [`start_tls`](Self::start_tls).
#[derive(Debug)]
pub struct RedisServer {
    process: ServerProcess,
    data: PathBuf,
    tls: Option<RedisTlsFiles>,
    _dir: TempDir,
}

impl RedisServer {
    /// Starts a server without persistence.
    pub async fn start() -> Result<Self> {
        Self::start_with(RedisPersistence::None).await
    }

    /// Starts a server with the given persistence.
    pub async fn start_with(persistence: RedisPersistence) -> Result<Self> {
        let program = find_binary("redis-server")?;
        let dir = temp_dir("redis", None)?;
        let data = dir.path().join("data");
        wipe(&data, None)?;
        let process = on_free_ports(1, |ports| {
            let port = ports[0];
            let launch = launch(&program, dir.path(), &data, port, persistence);
            async move {
                let mut process = ServerProcess::spawn(launch, port)?;
                process.wait_ready(READY_WITHIN, || answers(port)).await?;
                Ok(process)
            }
        })
        .await?;
        Ok(Self {
            process,
            data,
            tls: None,
            _dir: dir,
        })
    }

    /// Starts a server without persistence that also listens with TLS on a second
    /// port, with certificates made by `openssl` for this server alone.
    pub async fn start_tls(clients: TlsClients) -> Result<Self> {
        let program = find_binary("redis-server")?;
        let dir = temp_dir("redis", None)?;
        let data = dir.path().join("data");
        wipe(&data, None)?;
        let certs = make_certificates(dir.path())?;
        let (process, tls_port) = on_free_ports(2, |ports| {
            let (port, tls_port) = (ports[0], ports[1]);
            let launch = launch(&program, dir.path(), &data, port, RedisPersistence::None)
                .args(["--tls-port", &tls_port.to_string()])
                .arg("--tls-cert-file")
                .arg(&certs.server_cert)
                .arg("--tls-key-file")
                .arg(&certs.server_key)
                .arg("--tls-ca-cert-file")
                .arg(&certs.ca)
                .args([
                    "--tls-auth-clients",
                    match clients {
                        TlsClients::Optional => "optional",
                        TlsClients::Required => "yes",
                    },
                ]);
            async move {
                let mut process = ServerProcess::spawn(launch, port)?;
                process.wait_ready(READY_WITHIN, || answers(port)).await?;
                Ok((process, tls_port))
            }
        })
        .await?;
        Ok(Self {
            process,
            data,
            tls: Some(RedisTlsFiles {
                port: tls_port,
                ca: certs.ca,
                client_cert: certs.client_cert,
                client_key: certs.client_key,
                other_ca: certs.other_ca,
            }),
            _dir: dir,
        })
    }

    /// The TLS port and files, if started with [`start_tls`](Self::start_tls).
    pub fn tls(&self) -> Option<&RedisTlsFiles> {
        self.tls.as_ref()
    }

    /// `rediss://127.0.0.1:TLS_PORT/?ca=<test CA>` if started with
    /// [`start_tls`](Self::start_tls).
    pub fn tls_url(&self) -> Option<String> {
        self.tls
            .as_ref()
            .map(|tls| format!("rediss://127.0.0.1:{}/?ca={}", tls.port, tls.ca.display()))
    }

    /// Starts `count` independent servers (Redlock nodes), one after another.
    pub async fn start_many(count: usize, persistence: RedisPersistence) -> Result<Vec<Self>> {
        let mut servers = Vec::with_capacity(count);
        for _ in 0..count {
            servers.push(Self::start_with(persistence).await?);
        }
        Ok(servers)
    }
}

impl Server for RedisServer {
    fn process(&self) -> &ServerProcess {
        &self.process
    }

    fn process_mut(&mut self) -> &mut ServerProcess {
        &mut self.process
    }

    /// `redis://127.0.0.1:P/`
    fn url(&self) -> String {
        format!("redis://{}/", self.process.addr())
    }

    async fn restart(&mut self, keep_data: bool) -> Result<()> {
        self.process.stop().await?;
        if !keep_data {
            wipe(&self.data, None)?;
        }
        let port = self.process.port();
        self.process
            .start_again(READY_WITHIN, || answers(port))
            .await
    }
}

fn launch(
    program: &Path,
    dir: &Path,
    data: &Path,
    port: u16,
    persistence: RedisPersistence,
) -> Launch {
    let append_only = match persistence {
        RedisPersistence::None => "no",
        RedisPersistence::AppendOnly => "yes",
    };
    let port = port.to_string();
    Launch::new(format!("redis-server on 127.0.0.1:{port}"), program, dir)
        .args(["--port", &port, "--bind", "127.0.0.1", "--dir"])
        .arg(data)
        .args(["--save", "", "--appendonly", append_only])
        .args(["--appendfsync", "everysec", "--protected-mode", "no"])
        .args(["--enable-debug-command", "local"])
}

/// The PEM files of [`RedisServer::start_tls`].
struct Certificates {
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
    other_ca: PathBuf,
}

/// Makes a test CA (and a second, unrelated one), a server certificate for
/// `127.0.0.1` and `localhost`, and a client certificate, with `openssl` (P-256 keys,
/// valid for two days).
fn make_certificates(dir: &Path) -> Result<Certificates> {
    let openssl = find_binary("openssl")?;
    let certs = dir.join("tls");
    std::fs::create_dir(&certs).map_err(|e| HarnessError::io("create the tls dir", e))?;
    let path = |name: &str| certs.join(name);
    let run = |args: &[&std::ffi::OsStr]| -> Result<()> {
        let output = std::process::Command::new(&openssl)
            .args(args)
            .output()
            .map_err(|e| HarnessError::io("run openssl", e))?;
        if output.status.success() {
            return Ok(());
        }
        Err(HarnessError::io(
            format!(
                "make test certificates with openssl {:?}: {}",
                args,
                String::from_utf8_lossy(&output.stderr)
            ),
            std::io::Error::other("openssl failed"),
        ))
    };
    let os = |s: &str| std::ffi::OsString::from(s);
    let key_args = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    for (ca, subject) in [
        ("ca", "/CN=fencelock test CA"),
        ("other-ca", "/CN=unrelated CA"),
    ] {
        let mut args: Vec<std::ffi::OsString> = vec![os("req"), os("-x509")];
        args.extend(key_args.map(os));
        args.extend([
            os("-days"),
            os("2"),
            os("-subj"),
            os(subject),
            os("-keyout"),
        ]);
        args.extend([path(&format!("{ca}.key")).into(), os("-out")]);
        args.push(path(&format!("{ca}.pem")).into());
        run(&args.iter().map(|a| a.as_os_str()).collect::<Vec<_>>())?;
    }
    for (leaf, extensions) in [
        (
            "server",
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n\
             keyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n",
        ),
        (
            "client",
            "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\n\
             extendedKeyUsage=clientAuth\n",
        ),
    ] {
        let ext = path(&format!("{leaf}.ext"));
        write_file(&ext, extensions)?;
        let csr = path(&format!("{leaf}.csr"));
        let mut args: Vec<std::ffi::OsString> = vec![os("req")];
        args.extend(key_args.map(os));
        args.extend([
            os("-subj"),
            os(&format!("/CN=fencelock test {leaf}")),
            os("-keyout"),
        ]);
        args.extend([
            path(&format!("{leaf}.key")).into(),
            os("-out"),
            csr.clone().into(),
        ]);
        run(&args.iter().map(|a| a.as_os_str()).collect::<Vec<_>>())?;
        let args: Vec<std::ffi::OsString> = vec![
            os("x509"),
            os("-req"),
            os("-in"),
            csr.into(),
            os("-CA"),
            path("ca.pem").into(),
            os("-CAkey"),
            path("ca.key").into(),
            os("-CAcreateserial"),
            os("-days"),
            os("2"),
            os("-extfile"),
            ext.into(),
            os("-out"),
            path(&format!("{leaf}.pem")).into(),
        ];
        run(&args.iter().map(|a| a.as_os_str()).collect::<Vec<_>>())?;
    }
    Ok(Certificates {
        ca: path("ca.pem"),
        server_cert: path("server.pem"),
        server_key: path("server.key"),
        client_cert: path("client.pem"),
        client_key: path("client.key"),
        other_ca: path("other-ca.pem"),
    })
}

async fn answers(port: u16) -> bool {
    ask(port, b"PING\r\nQUIT\r\n")
        .await
        .is_some_and(|reply| reply.starts_with("+PONG"))
}
