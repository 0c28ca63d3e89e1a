//! NAR of a path on the host filesystem, as `nix-store --dump PATH` writes
//! it. File contents are copied through in chunks; directories are read one
//! at a time.

use std::fs;
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use super::{
    close, directory_open, entry_open, file_header, padding, symlink, token, NarError, NarHash,
    NarHasher, MAGIC,
};

/// Writes the NAR of `path` (not following a top-level symlink) to `out`.
pub fn write_path_nar(path: &Path, out: &mut impl Write) -> Result<(), NarError> {
    let mut buf = Vec::new();
    token(&mut buf, MAGIC);
    out.write_all(&buf).map_err(NarError::Write)?;
    write_node(path, out)
}

/// SHA-256 and length of the NAR of `path`, without holding the NAR.
pub fn nar_hash_path(path: &Path) -> Result<NarHash, NarError> {
    let mut hasher = NarHasher::new();
    write_path_nar(path, &mut hasher)?;
    Ok(hasher.finish())
}

fn write_node(path: &Path, out: &mut impl Write) -> Result<(), NarError> {
    let read_err = |source| NarError::ReadHost {
        path: path.to_owned(),
        source,
    };
    let meta = fs::symlink_metadata(path).map_err(read_err)?;
    let mut buf = Vec::new();
    let file_type = meta.file_type();
    if file_type.is_symlink() {
        let target = fs::read_link(path).map_err(read_err)?;
        symlink(&mut buf, target.as_os_str().as_bytes());
        return out.write_all(&buf).map_err(NarError::Write);
    }
    if file_type.is_file() {
        let executable = meta.permissions().mode() & 0o100 != 0;
        let mut file = fs::File::open(path).map_err(read_err)?;
        file_header(&mut buf, executable, meta.len());
        out.write_all(&buf).map_err(NarError::Write)?;
        let copied = copy_at_most(path, &mut file, out, meta.len())?;
        if copied != meta.len() {
            return Err(read_err(io::Error::other(format!(
                "file changed size while reading ({} bytes, then {copied})",
                meta.len()
            ))));
        }
        buf.clear();
        buf.extend_from_slice(padding(meta.len()));
        close(&mut buf);
        return out.write_all(&buf).map_err(NarError::Write);
    }
    if !file_type.is_dir() {
        return Err(NarError::UnsupportedFileType(path.to_owned()));
    }
    directory_open(&mut buf);
    out.write_all(&buf).map_err(NarError::Write)?;
    let mut names = Vec::new();
    for entry in fs::read_dir(path).map_err(read_err)? {
        names.push(entry.map_err(read_err)?.file_name());
    }
    // Nix sorts entries bytewise, like castore.
    names.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    for name in names {
        buf.clear();
        entry_open(&mut buf, name.as_bytes());
        out.write_all(&buf).map_err(NarError::Write)?;
        write_node(&path.join(&name), out)?;
        buf.clear();
        close(&mut buf);
        out.write_all(&buf).map_err(NarError::Write)?;
    }
    buf.clear();
    close(&mut buf);
    out.write_all(&buf).map_err(NarError::Write)
}

/// Copies at most `limit` bytes of `file`; returns how many were copied.
fn copy_at_most(
    path: &Path,
    file: &mut fs::File,
    out: &mut impl Write,
    limit: u64,
) -> Result<u64, NarError> {
    let mut chunk = vec![0u8; 64 * 1024];
    let mut copied = 0u64;
    while copied < limit {
        let want = usize::try_from(limit - copied).map_or(chunk.len(), |r| r.min(chunk.len()));
        let n = match io::Read::read(file, &mut chunk[..want]) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(source) => {
                return Err(NarError::ReadHost {
                    path: path.to_owned(),
                    source,
                })
            }
        };
        out.write_all(&chunk[..n]).map_err(NarError::Write)?;
        copied += n as u64;
    }
    Ok(copied)
}
