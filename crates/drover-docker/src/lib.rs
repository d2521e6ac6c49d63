//! The Docker Engine API as drover uses it, over the engine's unix socket
//! (`DOCKER_HOST` or `/var/run/docker.sock`), the API version negotiated:
//!
//! - the server builds a release's image from its checkout
//!   ([`build_image`]) and keeps it as a content-addressed artifact, a
//!   zstd-compressed `docker save` archive ([`save_image`]) — no registry;
//! - an agent loads that archive into its own engine ([`load_image`]) and
//!   runs one container per instance ([`ContainerSpec`], [`run_container`],
//!   [`wait_exit`], [`stop_and_remove`]); its containers carry its labels
//!   ([`LABEL_AGENT`], [`LABEL_INSTANCE`]) so that it finds them again after
//!   a restart and removes strays ([`list_agent_containers`]).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use bollard::errors::Error as DockerError;
use bollard::models::{ContainerCreateBody, HostConfig, PortBinding};
use bollard::query_parameters::{
    BuildImageOptionsBuilder, CreateContainerOptionsBuilder, ImportImageOptionsBuilder,
    ListContainersOptionsBuilder, LogsOptionsBuilder, RemoveContainerOptionsBuilder,
    StopContainerOptionsBuilder, TagImageOptionsBuilder,
};
pub use bollard::Docker;
use futures::{Stream, StreamExt, TryStreamExt};
use sha2::{Digest, Sha256};

/// The canonical data dir of the agent a container belongs to.
pub const LABEL_AGENT: &str = "drover.agent";
/// The instance id a container runs.
pub const LABEL_INSTANCE: &str = "drover.instance";
pub const LABEL_APP: &str = "drover.app";
pub const LABEL_RELEASE: &str = "drover.release";
/// The commit an image was built from.
pub const LABEL_COMMIT: &str = "drover.commit";

/// Connects to the local Docker Engine and negotiates the API version.
pub async fn connect() -> Result<Docker, String> {
    let where_ =
        std::env::var("DOCKER_HOST").unwrap_or_else(|_| "unix:///var/run/docker.sock".into());
    let d = Docker::connect_with_local_defaults()
        .map_err(|e| format!("cannot use the Docker Engine at {where_}: {e}"))?;
    d.negotiate_version().await.map_err(|e| {
        format!(
            "cannot reach the Docker Engine at {where_}: {e}; is Docker running, and may drover's user use its socket?"
        )
    })
}

/// A Docker error in one line; the engine's own message when it sent one.
pub fn describe(e: &DockerError) -> String {
    match e {
        DockerError::DockerResponseServerError {
            status_code,
            message,
        } => format!("Docker Engine answered {status_code}: {}", message.trim()),
        other => other.to_string(),
    }
}

fn is_not_found(e: &DockerError) -> bool {
    matches!(
        e,
        DockerError::DockerResponseServerError {
            status_code: 404,
            ..
        }
    )
}

// ------------------------------------------------------------- images ----

/// Builds the image of `context` (a checkout) with its `dockerfile`,
/// tagged `tag`, with `labels`; each line of the build's output goes to
/// `log`. Returns the image id (`sha256:…`). Never pulls on its own: a
/// `FROM` image must be in the engine already (or in a registry it can
/// reach).
pub async fn build_image(
    d: &Docker,
    context: &Path,
    dockerfile: &str,
    tag: &str,
    labels: &HashMap<String, String>,
    log: &mut (dyn FnMut(&str) + Send),
) -> Result<String, String> {
    // The build context as a tar file beside the checkout.
    let tar_path = context.with_extension("context.tar");
    let (ctx, out) = (context.to_path_buf(), tar_path.clone());
    tokio::task::spawn_blocking(move || context_tar(&ctx, &out))
        .await
        .map_err(|e| format!("context task failed: {e}"))??;
    let file = tokio::fs::File::open(&tar_path)
        .await
        .map_err(|e| format!("cannot open {}: {e}", tar_path.display()))?;
    let body = bollard::body_try_stream(tokio_util::io::ReaderStream::new(file));
    let opts = BuildImageOptionsBuilder::default()
        .dockerfile(dockerfile)
        .t(tag)
        .rm(true)
        .forcerm(true)
        .labels(labels)
        .build();
    let mut stream = d.build_image(opts, None, Some(body));
    let mut image_id = None;
    let mut failure = None;
    while let Some(item) = stream.next().await {
        match item {
            Ok(info) => {
                if let Some(s) = &info.stream {
                    for line in s.lines().filter(|l| !l.trim().is_empty()) {
                        log(line);
                    }
                }
                if let Some(s) = &info.status {
                    log(s);
                }
                if let Some(err) = info.error_detail.as_ref().and_then(|e| e.message.clone()) {
                    log(&err);
                    failure = Some(err);
                }
                if let Some(id) = info.aux.as_ref().and_then(|a| a.id.clone()) {
                    image_id = Some(id);
                }
            }
            Err(e) => {
                failure = Some(describe(&e));
                break;
            }
        }
    }
    let _ = tokio::fs::remove_file(&tar_path).await;
    if let Some(f) = failure {
        return Err(format!("docker build failed: {f}"));
    }
    match image_id {
        Some(id) => Ok(id),
        None => d
            .inspect_image(tag)
            .await
            .map_err(|e| format!("docker build ended without an image: {}", describe(&e)))?
            .id
            .ok_or_else(|| "docker build ended without an image id".to_string()),
    }
}

/// Writes `dir` as an uncompressed tar (the build context) to `out`;
/// symlinks stay links.
fn context_tar(dir: &Path, out: &Path) -> Result<(), String> {
    let f =
        std::fs::File::create(out).map_err(|e| format!("cannot create {}: {e}", out.display()))?;
    let mut b = tar::Builder::new(std::io::BufWriter::new(f));
    b.follow_symlinks(false);
    b.append_dir_all(".", dir)
        .and_then(|()| b.into_inner().and_then(|mut w| w.flush()))
        .map_err(|e| format!("cannot make the build context of {}: {e}", dir.display()))
}

/// Tags `image` as `repo:tag`.
pub async fn tag_image(d: &Docker, image: &str, repo: &str, tag: &str) -> Result<(), String> {
    let opts = TagImageOptionsBuilder::new().repo(repo).tag(tag).build();
    d.tag_image(image, Some(opts))
        .await
        .map_err(|e| format!("cannot tag {image} as {repo}:{tag}: {}", describe(&e)))
}

/// An image archive kept as an artifact.
#[derive(Debug, Clone)]
pub struct SavedImage {
    /// Hex sha256 of the compressed archive: its content address.
    pub sha256: String,
    pub size: u64,
    /// `dir/<sha256>.tar.zst`.
    pub path: PathBuf,
}

/// Removes the tag `name` (`repo:tag`); the image itself goes when that was
/// its last tag and no container uses it. A missing tag is fine.
pub async fn untag(d: &Docker, name: &str) -> Result<(), String> {
    match d
        .remove_image(
            name,
            None::<bollard::query_parameters::RemoveImageOptions>,
            None,
        )
        .await
    {
        Ok(_) => Ok(()),
        Err(e) if is_not_found(&e) => Ok(()),
        Err(e) => Err(format!("cannot remove image tag {name}: {}", describe(&e))),
    }
}

/// `docker save` of `image` (an id), zstd-compressed, into
/// `dir/<sha256>.tar.zst`.
pub async fn save_image(d: &Docker, image: &str, dir: &Path) -> Result<SavedImage, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let raw = dir.join(format!(
        ".save-{}.tar",
        std::process::id() as u64 ^ rand_suffix()
    ));
    {
        let mut f = tokio::fs::File::create(&raw)
            .await
            .map_err(|e| format!("cannot create {}: {e}", raw.display()))?;
        let mut stream = d.export_image(image);
        while let Some(chunk) = stream.next().await {
            let chunk = match chunk {
                Ok(c) => c,
                Err(e) => {
                    let _ = tokio::fs::remove_file(&raw).await;
                    return Err(format!("docker save of {image} failed: {}", describe(&e)));
                }
            };
            if let Err(e) = tokio::io::AsyncWriteExt::write_all(&mut f, &chunk).await {
                let _ = tokio::fs::remove_file(&raw).await;
                return Err(format!("cannot write {}: {e}", raw.display()));
            }
        }
        tokio::io::AsyncWriteExt::flush(&mut f)
            .await
            .map_err(|e| format!("cannot write {}: {e}", raw.display()))?;
    }
    let dir = dir.to_path_buf();
    let r = raw.clone();
    let res = tokio::task::spawn_blocking(move || compress(&r, &dir))
        .await
        .map_err(|e| format!("compress task failed: {e}"))?;
    let _ = std::fs::remove_file(&raw);
    res
}

fn rand_suffix() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// zstd of `raw` into `dir`, hashed on the way, renamed to its digest.
fn compress(raw: &Path, dir: &Path) -> Result<SavedImage, String> {
    struct Hashing<W> {
        inner: W,
        hash: Sha256,
        size: u64,
    }
    impl<W: Write> Write for Hashing<W> {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let n = self.inner.write(buf)?;
            self.hash.update(&buf[..n]);
            self.size += n as u64;
            Ok(n)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            self.inner.flush()
        }
    }
    let partial = raw.with_extension("tar.zst.partial");
    let io = |e: std::io::Error| format!("cannot compress the image archive: {e}");
    let out = std::fs::File::create(&partial).map_err(io)?;
    let mut enc = zstd::Encoder::new(
        Hashing {
            inner: std::io::BufWriter::new(out),
            hash: Sha256::new(),
            size: 0,
        },
        3,
    )
    .map_err(io)?;
    let mut input = std::fs::File::open(raw).map_err(io)?;
    std::io::copy(&mut input, &mut enc).map_err(io)?;
    let mut h = enc.finish().map_err(io)?;
    h.inner.flush().map_err(io)?;
    h.inner.get_ref().sync_all().map_err(io)?;
    let sha256 = hex::encode(h.hash.finalize());
    let path = dir.join(format!("{sha256}.tar.zst"));
    std::fs::rename(&partial, &path).map_err(io)?;
    Ok(SavedImage {
        sha256,
        size: h.size,
        path,
    })
}

/// A registry login.
#[derive(Clone)]
pub struct Login {
    pub username: String,
    pub password: String,
}

fn credentials(server: &str, login: Option<&Login>) -> Option<bollard::auth::DockerCredentials> {
    login.map(|l| bollard::auth::DockerCredentials {
        username: Some(l.username.clone()),
        password: Some(l.password.clone()),
        serveraddress: Some(server.to_string()),
        ..Default::default()
    })
}

/// The registry host of `repo` (`host[:port]/path`).
fn registry_host(repo: &str) -> &str {
    repo.split('/').next().unwrap_or(repo)
}

/// Tags `image` as `repo:tag` and pushes it; returns the pushed manifest's
/// digest reference, `repo@sha256:…`.
pub async fn push_image(
    d: &Docker,
    image: &str,
    repo: &str,
    tag: &str,
    login: Option<&Login>,
    log: &mut (dyn FnMut(&str) + Send),
) -> Result<String, String> {
    tag_image(d, image, repo, tag).await?;
    let opts = bollard::query_parameters::PushImageOptionsBuilder::new()
        .tag(tag)
        .build();
    let mut stream = d.push_image(repo, Some(opts), credentials(registry_host(repo), login));
    while let Some(item) = stream.next().await {
        let info =
            item.map_err(|e| format!("docker push {repo}:{tag} failed: {}", describe(&e)))?;
        if let Some(err) = info.error_detail.and_then(|e| e.message) {
            return Err(format!("docker push {repo}:{tag} failed: {err}"));
        }
        if let Some(s) = info.status {
            if !s.trim().is_empty() {
                log(&s);
            }
        }
    }
    let inspected = d
        .inspect_image(image)
        .await
        .map_err(|e| format!("cannot inspect {image} after the push: {}", describe(&e)))?;
    inspected
        .repo_digests
        .unwrap_or_default()
        .into_iter()
        .find(|r| r.split_once('@').is_some_and(|(name, _)| name == repo))
        .ok_or_else(|| format!("the push of {repo}:{tag} reported no digest"))
}

/// Pulls `reference` (`repo@sha256:…`) and checks it is image `id`.
pub async fn pull_image(
    d: &Docker,
    reference: &str,
    id: &str,
    login: Option<&Login>,
) -> Result<(), String> {
    let (repo, _) = reference
        .split_once('@')
        .ok_or_else(|| format!("{reference:?} is not a digest reference (repo@sha256:…)"))?;
    let opts = bollard::query_parameters::CreateImageOptionsBuilder::new()
        .from_image(reference)
        .build();
    let mut stream = d.create_image(Some(opts), None, credentials(registry_host(repo), login));
    while let Some(item) = stream.next().await {
        let info = item.map_err(|e| format!("docker pull {reference} failed: {}", describe(&e)))?;
        if let Some(err) = info.error_detail.and_then(|e| e.message) {
            return Err(format!("docker pull {reference} failed: {err}"));
        }
    }
    if has_image(d, id).await? {
        Ok(())
    } else {
        Err(format!("pulled {reference}, but it is not image {id}"))
    }
}

/// Whether the engine has the image `id`.
pub async fn has_image(d: &Docker, id: &str) -> Result<bool, String> {
    match d.inspect_image(id).await {
        Ok(_) => Ok(true),
        Err(e) if is_not_found(&e) => Ok(false),
        Err(e) => Err(format!("cannot inspect image {id}: {}", describe(&e))),
    }
}

/// `docker load` of a zstd-compressed archive made by [`save_image`];
/// checks that it held `id`.
pub async fn load_image(d: &Docker, archive: &Path, id: &str) -> Result<(), String> {
    let raw = archive.with_extension("load.tar");
    let (a, r) = (archive.to_path_buf(), raw.clone());
    tokio::task::spawn_blocking(move || -> Result<(), String> {
        let io = |e: std::io::Error| format!("cannot decompress {}: {e}", a.display());
        let mut dec = zstd::Decoder::new(std::fs::File::open(&a).map_err(io)?).map_err(io)?;
        let mut out = std::io::BufWriter::new(std::fs::File::create(&r).map_err(io)?);
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = dec.read(&mut buf).map_err(io)?;
            if n == 0 {
                break;
            }
            out.write_all(&buf[..n]).map_err(io)?;
        }
        out.flush().map_err(io)
    })
    .await
    .map_err(|e| format!("decompress task failed: {e}"))??;
    let result = async {
        let file = tokio::fs::File::open(&raw)
            .await
            .map_err(|e| format!("cannot open {}: {e}", raw.display()))?;
        let body = bollard::body_try_stream(tokio_util::io::ReaderStream::new(file));
        let opts = ImportImageOptionsBuilder::new().quiet(true).build();
        let mut stream = d.import_image(opts, body, None);
        while let Some(item) = stream.next().await {
            let info = item.map_err(|e| format!("docker load failed: {}", describe(&e)))?;
            if let Some(err) = info.error_detail.and_then(|e| e.message) {
                return Err(format!("docker load failed: {err}"));
            }
        }
        Ok::<(), String>(())
    }
    .await;
    let _ = tokio::fs::remove_file(&raw).await;
    result?;
    if has_image(d, id).await? {
        Ok(())
    } else {
        Err(format!(
            "the image archive {} does not hold image {id}",
            archive.display()
        ))
    }
}

// --------------------------------------------------------- containers ----

/// One instance's container.
#[derive(Debug, Clone)]
pub struct ContainerSpec {
    /// `drover-<instance>`.
    pub name: String,
    pub image: String,
    /// Empty: the image's own command; else run with `sh -c` in it.
    pub command: String,
    /// `KEY=value`.
    pub env: Vec<String>,
    pub labels: HashMap<String, String>,
    /// The instance's port: the app listens on it inside the container
    /// (`PORT`), published on the host's `host_ip` under the same number.
    pub port: u16,
    pub host_ip: String,
    pub memory_bytes: Option<u64>,
    pub cpus: Option<f64>,
}

/// The container name of an instance.
pub fn container_name(instance: &str) -> String {
    format!("drover-{instance}")
}

/// Creates and starts the container (removing a leftover of the same name
/// first); returns its id.
pub async fn run_container(d: &Docker, spec: &ContainerSpec) -> Result<String, String> {
    remove(d, &spec.name).await?;
    let port_key = format!("{}/tcp", spec.port);
    let host_config = HostConfig {
        port_bindings: Some(HashMap::from([(
            port_key.clone(),
            Some(vec![PortBinding {
                host_ip: Some(spec.host_ip.clone()),
                host_port: Some(spec.port.to_string()),
            }]),
        )])),
        // The engine's own copy of the output (read back by the agent into
        // the instance log, which it rotates) is bounded too.
        log_config: Some(bollard::models::HostConfigLogConfig {
            typ: Some("json-file".into()),
            config: Some(HashMap::from([
                ("max-size".to_string(), "10m".to_string()),
                ("max-file".to_string(), "2".to_string()),
            ])),
        }),
        memory: spec.memory_bytes.map(|m| m as i64),
        nano_cpus: spec.cpus.map(|c| (c * 1e9) as i64),
        ..Default::default()
    };
    let body = ContainerCreateBody {
        image: Some(spec.image.clone()),
        cmd: (!spec.command.is_empty())
            .then(|| vec!["sh".to_string(), "-c".to_string(), spec.command.clone()]),
        env: Some(spec.env.clone()),
        labels: Some(spec.labels.clone()),
        exposed_ports: Some(vec![port_key]),
        host_config: Some(host_config),
        ..Default::default()
    };
    let opts = CreateContainerOptionsBuilder::new()
        .name(&spec.name)
        .build();
    let created = d
        .create_container(Some(opts), body)
        .await
        .map_err(|e| format!("cannot create container {}: {}", spec.name, describe(&e)))?;
    if let Err(e) = d.start_container(&created.id, None).await {
        let _ = remove(d, &created.id).await;
        return Err(format!(
            "cannot start container {}: {}",
            spec.name,
            describe(&e)
        ));
    }
    Ok(created.id)
}

/// Whether the container runs; `None` when it does not exist.
pub async fn is_running(d: &Docker, id: &str) -> Result<Option<bool>, String> {
    match d.inspect_container(id, None).await {
        Ok(c) => Ok(Some(c.state.and_then(|s| s.running).unwrap_or(false))),
        Err(e) if is_not_found(&e) => Ok(None),
        Err(e) => Err(format!("cannot inspect container {id}: {}", describe(&e))),
    }
}

/// Waits for the container to stop; describes how (exit status, or killed
/// for want of memory). Cancel-safe.
pub async fn wait_exit(d: &Docker, id: &str) -> String {
    let mut stream = d.wait_container(id, None);
    let how = match stream.next().await {
        Some(Ok(r)) => format!("exited with status {}", r.status_code),
        Some(Err(DockerError::DockerContainerWaitError { code, error })) => {
            if error.is_empty() {
                format!("exited with status {code}")
            } else {
                format!("exited with status {code}: {error}")
            }
        }
        Some(Err(e)) if is_not_found(&e) => "container removed".to_string(),
        Some(Err(e)) => format!("container gone ({})", describe(&e)),
        None => "container stopped".to_string(),
    };
    match d.inspect_container(id, None).await {
        Ok(c) if c.state.as_ref().and_then(|s| s.oom_killed) == Some(true) => {
            format!("{how} (killed: out of memory)")
        }
        _ => how,
    }
}

/// Stops the container (its stop signal, then SIGKILL after `timeout_s`)
/// and removes it.
pub async fn stop_and_remove(d: &Docker, id: &str, timeout_s: i32) -> Result<(), String> {
    let opts = StopContainerOptionsBuilder::new().t(timeout_s).build();
    match d.stop_container(id, Some(opts)).await {
        Ok(()) => {}
        Err(e) if is_not_found(&e) => return Ok(()),
        // 304: already stopped.
        Err(DockerError::DockerResponseServerError {
            status_code: 304, ..
        }) => {}
        Err(e) => return Err(format!("cannot stop container {id}: {}", describe(&e))),
    }
    remove(d, id).await
}

/// Removes the container, running or not; a missing one is fine.
pub async fn remove(d: &Docker, id: &str) -> Result<(), String> {
    let opts = RemoveContainerOptionsBuilder::new().force(true).build();
    match d.remove_container(id, Some(opts)).await {
        Ok(()) => Ok(()),
        Err(e) if is_not_found(&e) => Ok(()),
        Err(e) => Err(format!("cannot remove container {id}: {}", describe(&e))),
    }
}

/// A container carrying an agent's labels.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentContainer {
    pub id: String,
    pub instance: String,
    pub running: bool,
}

/// The containers (running or not) labelled as the agent's with data dir
/// `agent_dir`.
pub async fn list_agent_containers(
    d: &Docker,
    agent_dir: &str,
) -> Result<Vec<AgentContainer>, String> {
    let filters = HashMap::from([("label", vec![format!("{LABEL_AGENT}={agent_dir}")])]);
    let opts = ListContainersOptionsBuilder::new()
        .all(true)
        .filters(&filters)
        .build();
    let list = d
        .list_containers(Some(opts))
        .await
        .map_err(|e| format!("cannot list containers: {}", describe(&e)))?;
    Ok(list
        .into_iter()
        .filter_map(|c| {
            let instance = c.labels.as_ref()?.get(LABEL_INSTANCE)?.clone();
            Some(AgentContainer {
                id: c.id?,
                instance,
                running: c.state.map(|s| s.to_string() == "running").unwrap_or(false),
            })
        })
        .collect())
}

/// The container's output (stdout and stderr, in order) from `since`
/// (unix seconds; 0: from its start), following it while it runs.
pub fn follow_logs(
    d: &Docker,
    id: &str,
    since: i32,
) -> impl Stream<Item = Result<bytes::Bytes, String>> + use<> {
    let opts = LogsOptionsBuilder::new()
        .follow(true)
        .stdout(true)
        .stderr(true)
        .since(since)
        .build();
    d.logs(id, Some(opts))
        .map_ok(|o| o.into_bytes())
        .map_err(|e| describe(&e))
}
