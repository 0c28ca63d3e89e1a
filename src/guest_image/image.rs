//! The initramfs: a cached base archive plus a per-build job archive.

use std::fs;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use kiln_guest::contract::{Job, Warm, JOB_PATH, MODULES_DIR, SHELL_PATH, WARM_PATH};

use super::cpio::CpioWriter;
use super::{Artifacts, GuestImageError};

/// Bump when the base image layout changes, so old cache entries are unused.
const LAYOUT_VERSION: &[u8] = b"kiln-base-initramfs-2";

/// Returns the base initramfs for `artifacts` under `cache_dir`, writing it
/// first if no image with the same content exists: the agent as `/init`, every
/// module of the kernel dir under [`MODULES_DIR`], busybox at [`SHELL_PATH`].
/// The file name is the BLAKE3 of everything that goes into it, so a new
/// agent or kernel gives a new image and concurrent writers agree.
pub fn base_image(artifacts: &Artifacts, cache_dir: &Path) -> Result<PathBuf, GuestImageError> {
    artifacts.locate()?;
    let read = |p: &Path| {
        fs::read(p).map_err(|source| GuestImageError::ReadArtifact {
            path: p.to_path_buf(),
            source,
        })
    };
    let agent = read(&artifacts.agent)?;
    let busybox = read(&artifacts.busybox)?;
    let mut modules = Vec::new();
    let dir = artifacts.modules_dir();
    let entries = fs::read_dir(&dir).map_err(|source| GuestImageError::ReadArtifact {
        path: dir.clone(),
        source,
    })?;
    for entry in entries {
        let entry = entry.map_err(|source| GuestImageError::ReadArtifact {
            path: dir.clone(),
            source,
        })?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.ends_with(".ko") {
            let bytes = read(&entry.path())?;
            modules.push((name, strip_module_signature(&bytes).to_vec()));
        }
    }
    modules.sort();

    let mut hasher = blake3::Hasher::new();
    hasher.update(LAYOUT_VERSION);
    for (name, bytes) in [("init", &agent), ("sh", &busybox)]
        .into_iter()
        .chain(modules.iter().map(|(n, b)| (n.as_str(), b)))
    {
        hasher.update(&(name.len() as u64).to_le_bytes());
        hasher.update(name.as_bytes());
        hasher.update(&(bytes.len() as u64).to_le_bytes());
        hasher.update(bytes);
    }
    let hash = hasher.finalize().to_hex();
    let path = cache_dir.join(format!("base-{}.cpio", &hash[..32]));
    if path.exists() {
        return Ok(path);
    }

    let write_err = |source| GuestImageError::WriteImage {
        path: path.clone(),
        source,
    };
    fs::create_dir_all(cache_dir).map_err(write_err)?;
    let tmp = tempfile::NamedTempFile::new_in(cache_dir).map_err(write_err)?;
    let mut w = CpioWriter::new(BufWriter::new(tmp.as_file()));
    w.file("init", 0o755, &agent).map_err(write_err)?;
    w.dir(MODULES_DIR, 0o755).map_err(write_err)?;
    for (name, bytes) in &modules {
        w.file(&format!("{MODULES_DIR}/{name}"), 0o644, bytes)
            .map_err(write_err)?;
    }
    w.file(SHELL_PATH, 0o755, &busybox).map_err(write_err)?;
    for d in ["proc", "sys", "dev", "tmp"] {
        w.dir(d, 0o755).map_err(write_err)?;
    }
    w.finish()
        .map_err(write_err)?
        .into_inner()
        .map_err(|e| write_err(e.into_error()))?;
    tmp.persist(&path).map_err(|e| write_err(e.error))?;
    Ok(path)
}

/// The trailer the kernel's signing tool appends to a signed module.
const SIGNATURE_MARKER: &[u8] = b"~Module signature appended~\n";

/// A module without its appended signature, or unchanged if it has none.
///
/// Checking an RSA signature is slow under TCG (most of the agent's module
/// loading time) and buys nothing here: the modules' integrity was checked on
/// the host, by apt, when the kernel package was fetched. The guest kernel
/// does not enforce signatures, so it loads them and notes a taint.
pub fn strip_module_signature(ko: &[u8]) -> &[u8] {
    // Layout: module | signature | 12-byte descriptor (sig_len is its last
    // 4 bytes, big-endian) | marker.
    let Some(body) = ko.strip_suffix(SIGNATURE_MARKER) else {
        return ko;
    };
    let Some(descriptor_start) = body.len().checked_sub(12) else {
        return ko;
    };
    let len = &body[body.len() - 4..];
    let sig_len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
    match descriptor_start.checked_sub(sig_len) {
        Some(end) => &ko[..end],
        None => ko,
    }
}

/// The per-build archive: the job as JSON at [`JOB_PATH`].
pub fn job_archive(job: &Job) -> Result<Vec<u8>, GuestImageError> {
    let json = serde_json::to_vec(job).map_err(GuestImageError::EncodeJob)?;
    one_file_archive(JOB_PATH, &json)
}

/// A cpio archive holding `path` with `contents`.
fn one_file_archive(path: &str, contents: &[u8]) -> Result<Vec<u8>, GuestImageError> {
    let mut w = CpioWriter::new(Vec::new());
    let err = |source| GuestImageError::WriteImage {
        path: PathBuf::from(path),
        source,
    };
    w.file(path, 0o644, contents).map_err(err)?;
    w.finish().map_err(err)
}

/// Writes `dest`: the base image followed by the job archive, the one file
/// the VMM loads as initramfs.
pub fn build_initramfs(base: &Path, job: &Job, dest: &Path) -> Result<(), GuestImageError> {
    append_to_base(base, &job_archive(job)?, dest)
}

/// Writes `dest` for a warm VM: the base image followed by an archive of
/// [`WARM_PATH`] (see `kiln_guest::contract`: the job comes later, over
/// the channel).
pub fn build_warm_initramfs(base: &Path, warm: &Warm, dest: &Path) -> Result<(), GuestImageError> {
    let json = serde_json::to_vec(warm).map_err(GuestImageError::EncodeJob)?;
    append_to_base(base, &one_file_archive(WARM_PATH, &json)?, dest)
}

/// `dest` = `base` then `archive`. Not synced: the VMM reads it from the
/// page cache moments later, and a crash loses the build anyway.
fn append_to_base(base: &Path, archive: &[u8], dest: &Path) -> Result<(), GuestImageError> {
    let write_err = |source| GuestImageError::WriteImage {
        path: dest.to_path_buf(),
        source,
    };
    fs::copy(base, dest).map_err(|source| GuestImageError::ReadArtifact {
        path: base.to_path_buf(),
        source,
    })?;
    let mut f = fs::OpenOptions::new()
        .append(true)
        .open(dest)
        .map_err(write_err)?;
    f.write_all(archive).map_err(write_err)?;
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly on purpose
mod tests {
    use super::*;

    fn fake_artifacts(dir: &Path) -> Artifacts {
        let a = Artifacts {
            busybox: dir.join("busybox"),
            ..Artifacts::in_cache_dir(dir)
        };
        fs::create_dir_all(a.modules_dir()).unwrap();
        fs::create_dir_all(a.agent.parent().unwrap()).unwrap();
        fs::write(a.vmlinux(), b"kernel").unwrap();
        fs::write(a.modules_dir().join("virtio.ko"), b"module").unwrap();
        fs::write(&a.agent, b"agent-v1").unwrap();
        fs::write(&a.busybox, b"busybox").unwrap();
        a
    }

    fn listing(path: &Path) -> Option<String> {
        let out = std::process::Command::new("cpio")
            .args(["-t", "--quiet", "-F"])
            .arg(path)
            .output()
            .ok()?;
        Some(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    #[test]
    fn base_image_is_cached_by_content() {
        let dir = tempfile::tempdir().unwrap();
        let a = fake_artifacts(dir.path());
        let cache = dir.path().join("images");
        let first = base_image(&a, &cache).unwrap();
        let modified = fs::metadata(&first).unwrap().modified().unwrap();
        assert_eq!(base_image(&a, &cache).unwrap(), first);
        assert_eq!(
            fs::metadata(&first).unwrap().modified().unwrap(),
            modified,
            "rewritten"
        );
        fs::write(&a.agent, b"agent-v2").unwrap();
        let second = base_image(&a, &cache).unwrap();
        assert_ne!(second, first);
    }

    #[test]
    fn initramfs_is_base_then_job_and_cpio_reads_both() {
        let dir = tempfile::tempdir().unwrap();
        let a = fake_artifacts(dir.path());
        let base = base_image(&a, &dir.path().join("images")).unwrap();
        let job = Job {
            command_args: vec!["/bin/true".into()],
            ..Job::default()
        };
        let dest = dir.path().join("initramfs");
        build_initramfs(&base, &job, &dest).unwrap();
        let bytes = fs::read(&dest).unwrap();
        let base_bytes = fs::read(&base).unwrap();
        assert!(bytes.starts_with(&base_bytes));
        let json = serde_json::to_vec(&job).unwrap();
        assert!(bytes[base_bytes.len()..]
            .windows(json.len())
            .any(|w| w == json.as_slice()));
        let Some(list) = listing(&base) else {
            test_skip!("the cpio listing check because `cpio` is not installed");
            return;
        };
        for name in ["init", "kiln/modules/virtio.ko", "kiln/sh"] {
            assert!(list.lines().any(|l| l == name), "{name} missing in\n{list}");
        }
    }

    #[test]
    fn module_signatures_are_stripped_exactly() {
        let mut ko = b"\x7fELF module body".to_vec();
        let body_len = ko.len();
        ko.extend_from_slice(&[0xAA; 5]);
        ko.extend_from_slice(&[0, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 5]);
        ko.extend_from_slice(SIGNATURE_MARKER);
        assert_eq!(strip_module_signature(&ko), &ko[..body_len]);
        assert_eq!(strip_module_signature(b"unsigned"), b"unsigned");
        // A marker with an impossible length leaves the file alone.
        let mut bad = vec![0u8; 8];
        bad.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]);
        bad.extend_from_slice(SIGNATURE_MARKER);
        assert_eq!(strip_module_signature(&bad), bad.as_slice());
    }

    #[test]
    fn real_modules_lose_exactly_their_signature() {
        let dir = std::path::Path::new(crate::guest_image::DEBIAN_KERNEL_DIR).join("modules");
        let Ok(ko) = fs::read(dir.join("virtio.ko")) else {
            test_skip!("real_modules_lose_exactly_their_signature because {} has no virtio.ko (make kernel)", dir.display());
            return;
        };
        let stripped = strip_module_signature(&ko);
        assert!(stripped.len() < ko.len(), "virtio.ko is not signed?");
        assert!(stripped.starts_with(b"\x7fELF"));
        assert!(!stripped.ends_with(SIGNATURE_MARKER));
    }

    #[test]
    fn missing_artifacts_fail_before_writing() {
        let dir = tempfile::tempdir().unwrap();
        let a = fake_artifacts(dir.path());
        fs::remove_file(&a.agent).unwrap();
        let err = base_image(&a, &dir.path().join("images")).unwrap_err();
        assert!(
            matches!(
                err,
                GuestImageError::Missing {
                    what: "guest agent",
                    ..
                }
            ),
            "{err}"
        );
    }
}
