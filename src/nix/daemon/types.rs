//! The worker protocol's composite values: store paths, path infos,
//! derived paths, inline derivations and build results, read from the
//! client and written back, for protocols 1.34 to 1.37.

use std::collections::{BTreeMap, BTreeSet};

use tokio::io::AsyncRead;

use super::protocol::{BuildStatus, ProtocolVersion};
use super::wire::{Frame, WireError, WireReader, MAX_LONG, MAX_PATH, MAX_SHORT};
use crate::nix::derivation::{Derivation, Output};
use crate::nix::hash::{Hash, HashAlgorithm};
use crate::nix::store_path::StorePathError;
use crate::nix::StorePath;

/// What the client sent cannot be used (the stream itself is still in step).
#[derive(Debug, thiserror::Error)]
pub enum ValueError {
    /// Not a store path.
    #[error("{what} {value:?} is not a store path")]
    StorePath {
        /// Which value.
        what: &'static str,
        /// What was sent.
        value: String,
        /// Why.
        #[source]
        source: StorePathError,
    },
    /// Not a SHA-256 NAR hash.
    #[error("NAR hash {0:?} is not a SHA-256 hash")]
    NarHash(String),
    /// Not a derived path (`PATH`, `DRV!OUT,…` or `DRV!*`).
    #[error("{0:?} is not a derived path")]
    DerivedPath(String),
}

/// A value could not be read: either the stream is out of step
/// ([`ReadError::Wire`]) or a value is unusable ([`ReadError::Value`]).
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The bytes themselves.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// A well-formed but unusable value.
    #[error(transparent)]
    Value(#[from] ValueError),
}

/// A store path as the protocol prints it: absolute.
pub fn parse_store_path(what: &'static str, s: &str) -> Result<StorePath, ValueError> {
    StorePath::from_absolute_path(s).map_err(|source| ValueError::StorePath {
        what,
        value: s.to_owned(),
        source,
    })
}

/// Reads one absolute store path.
pub async fn read_store_path<R: AsyncRead + Unpin + Send>(
    r: &mut WireReader<R>,
    what: &'static str,
) -> Result<StorePath, ReadError> {
    let s = r.string(what, MAX_PATH).await?;
    Ok(parse_store_path(what, &s)?)
}

/// Reads a list of absolute store paths.
pub async fn read_store_paths<R: AsyncRead + Unpin + Send>(
    r: &mut WireReader<R>,
    what: &'static str,
) -> Result<BTreeSet<StorePath>, ReadError> {
    // Parse all, so that the stream stays in step even if one is bad.
    let strings = r.strings(what, MAX_PATH).await?;
    let mut out = BTreeSet::new();
    for s in strings {
        out.insert(parse_store_path(what, &s)?);
    }
    Ok(out)
}

/// Appends store paths as a list.
pub fn write_store_paths<'a>(
    frame: Frame,
    paths: impl IntoIterator<Item = &'a StorePath>,
) -> Frame {
    let strings: Vec<String> = paths.into_iter().map(StorePath::to_absolute_path).collect();
    frame.strings(strings)
}

/// A path's metadata as the protocol carries it (`ValidPathInfo`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WirePathInfo {
    /// The path.
    pub path: StorePath,
    /// The derivation that built it, if known.
    pub deriver: Option<StorePath>,
    /// SHA-256 of its NAR.
    pub nar_sha256: [u8; 32],
    /// Paths it refers to (itself included, if it does).
    pub references: BTreeSet<StorePath>,
    /// Seconds since the epoch.
    pub registration_time: u64,
    /// Size of its NAR.
    pub nar_size: u64,
    /// Whether it was built locally ("ultimately trusted").
    pub ultimate: bool,
    /// Signatures, `<key name>:<base64>`.
    pub signatures: Vec<String>,
    /// Content address (`text:sha256:…`, `fixed:r:sha256:…`), or empty.
    pub ca: String,
}

/// Reads a path info whose path comes first (`AddToStoreNar`,
/// `AddMultipleToStore`).
pub async fn read_path_info<R: AsyncRead + Unpin + Send>(
    r: &mut WireReader<R>,
) -> Result<WirePathInfo, ReadError> {
    let path = r.string("the path", MAX_PATH).await?;
    let deriver = r.string("the deriver", MAX_PATH).await?;
    let nar_hash = r.string("the NAR hash", MAX_SHORT).await?;
    let references = r.strings("the references", MAX_PATH).await?;
    let registration_time = r.u64("the registration time").await?;
    let nar_size = r.u64("the NAR size").await?;
    let ultimate = r.bool("the ultimate flag").await?;
    let signatures = r.strings("the signatures", MAX_SHORT).await?;
    let ca = r.string("the content address", MAX_SHORT).await?;
    // Everything is read: the values are checked now.
    let path = parse_store_path("path", &path)?;
    let deriver = match deriver.as_str() {
        "" => None,
        s => Some(parse_store_path("deriver", s)?),
    };
    let nar_sha256 = match Hash::parse(&nar_hash, HashAlgorithm::Sha256) {
        Ok(Hash::Sha256(d)) => d,
        _ => return Err(ValueError::NarHash(nar_hash).into()),
    };
    let mut refs = BTreeSet::new();
    for s in references {
        refs.insert(parse_store_path("reference", &s)?);
    }
    Ok(WirePathInfo {
        path,
        deriver,
        nar_sha256,
        references: refs,
        registration_time,
        nar_size,
        ultimate,
        signatures,
        ca,
    })
}

/// Appends a path info without its path (`QueryPathInfo`'s answer).
pub fn write_path_info(frame: Frame, info: &WirePathInfo) -> Frame {
    let frame = frame
        .string(
            &info
                .deriver
                .as_ref()
                .map(StorePath::to_absolute_path)
                .unwrap_or_default(),
        )
        .string(&hex::encode(info.nar_sha256));
    write_store_paths(frame, &info.references)
        .u64(info.registration_time)
        .u64(info.nar_size)
        .bool(info.ultimate)
        .strings(&info.signatures)
        .string(&info.ca)
}

/// Which outputs of a derivation are wanted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutputsSpec {
    /// `*`: all of them.
    All,
    /// These.
    Names(BTreeSet<String>),
}

/// A derived path (`DerivedPath`): a store path as it is, or outputs of a
/// derivation to build. Protocol 1.30+ spells them `PATH`, `DRV!OUT,OUT`
/// and `DRV!*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DerivedPath {
    /// A store path that must be valid.
    Opaque(StorePath),
    /// Outputs of a `.drv` file in the store.
    Built {
        /// The derivation.
        drv: StorePath,
        /// Which outputs.
        outputs: OutputsSpec,
    },
}

impl DerivedPath {
    /// Parses the protocol's string form.
    pub fn parse(s: &str) -> Result<Self, ValueError> {
        let bad = || ValueError::DerivedPath(s.to_owned());
        match s.split_once('!') {
            None => Ok(DerivedPath::Opaque(parse_store_path("derived path", s)?)),
            Some((drv, outputs)) => {
                let drv = parse_store_path("derivation", drv)?;
                if !drv.is_derivation() {
                    return Err(bad());
                }
                let outputs = if outputs == "*" {
                    OutputsSpec::All
                } else {
                    let names: BTreeSet<String> = outputs.split(',').map(str::to_owned).collect();
                    if names.iter().any(|n| n.is_empty() || n.contains('!')) {
                        return Err(bad());
                    }
                    OutputsSpec::Names(names)
                };
                Ok(DerivedPath::Built { drv, outputs })
            }
        }
    }
}

impl std::fmt::Display for DerivedPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DerivedPath::Opaque(p) => write!(f, "{p}"),
            DerivedPath::Built { drv, outputs } => {
                write!(f, "{drv}!")?;
                match outputs {
                    OutputsSpec::All => f.write_str("*"),
                    OutputsSpec::Names(names) => {
                        let names: Vec<&str> = names.iter().map(String::as_str).collect();
                        f.write_str(&names.join(","))
                    }
                }
            }
        }
    }
}

/// Reads a list of derived paths.
pub async fn read_derived_paths<R: AsyncRead + Unpin + Send>(
    r: &mut WireReader<R>,
) -> Result<Vec<(String, DerivedPath)>, ReadError> {
    let strings = r.strings("the derived paths", MAX_PATH + MAX_SHORT).await?;
    let mut out = Vec::new();
    for s in strings {
        let parsed = DerivedPath::parse(&s)?;
        out.push((s, parsed));
    }
    Ok(out)
}

/// Reads a derivation sent inline (`BuildDerivation`'s `BasicDerivation`):
/// outputs, input sources, platform, builder, arguments, environment. It has
/// no input derivations: the client lists everything as input sources.
pub async fn read_basic_derivation<R: AsyncRead + Unpin + Send>(
    r: &mut WireReader<R>,
) -> Result<Derivation, ReadError> {
    let n = r.count("the outputs").await?;
    let mut outputs_raw = Vec::new();
    for _ in 0..n {
        let name = r.string("an output name", MAX_SHORT).await?;
        let path = r.string("an output path", MAX_PATH).await?;
        let hash_algorithm = r.string("an output's hash algorithm", MAX_SHORT).await?;
        let hash = r.string("an output's hash", MAX_SHORT).await?;
        outputs_raw.push((name, path, hash_algorithm, hash));
    }
    let input_sources = r.strings("the input sources", MAX_PATH).await?;
    let system = r.string("the platform", MAX_SHORT).await?;
    let builder = r.string("the builder", MAX_LONG).await?;
    let arguments = r.strings("the arguments", MAX_LONG).await?;
    let n = r.count("the environment").await?;
    let mut environment = BTreeMap::new();
    for _ in 0..n {
        let key = r.string("an environment name", MAX_SHORT).await?;
        let value = r.bytes("an environment value", MAX_LONG).await?;
        environment.insert(key, value);
    }
    let mut outputs = BTreeMap::new();
    for (name, path, hash_algorithm, hash) in outputs_raw {
        let path = match path.as_str() {
            "" => None,
            p => Some(parse_store_path("output path", p)?),
        };
        outputs.insert(
            name,
            Output {
                path,
                hash_algorithm,
                hash,
            },
        );
    }
    let mut sources = BTreeSet::new();
    for s in input_sources {
        sources.insert(parse_store_path("input source", &s)?);
    }
    Ok(Derivation {
        outputs,
        input_derivations: BTreeMap::new(),
        input_sources: sources,
        system,
        builder,
        arguments,
        environment,
    })
}

/// A build's result (`BuildResult`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildResult {
    /// How it ended.
    pub status: BuildStatus,
    /// Why it failed; empty on success.
    pub error: String,
    /// Seconds since the epoch.
    pub start_time: u64,
    /// Seconds since the epoch.
    pub stop_time: u64,
    /// Output name → path, for the outputs built.
    pub built_outputs: BTreeMap<String, StorePath>,
}

/// The `DrvOutput` id kiln gives built outputs. Old clients read the map
/// but only use the output name and path; current Nix itself sends this
/// placeholder hash for them.
const DUMMY_DRV_HASH: &str =
    "sha256:0000000000000000000000000000000000000000000000000000000000000000";

/// Appends a build result as `version` spells it.
pub fn write_build_result(frame: Frame, result: &BuildResult, version: ProtocolVersion) -> Frame {
    let mut frame = frame.u64(result.status as u64).string(&result.error);
    if version.at_least(29) {
        frame = frame
            .u64(u64::from(result.status == BuildStatus::Built))
            .bool(false)
            .u64(result.start_time)
            .u64(result.stop_time);
    }
    if version.at_least(37) {
        // cpuUser and cpuSystem: not measured.
        frame = frame.u64(0).u64(0);
    }
    if version.at_least(28) {
        frame = frame.u64(result.built_outputs.len() as u64);
        for (name, path) in &result.built_outputs {
            let id = format!("{DUMMY_DRV_HASH}!{name}");
            let realisation = serde_json::json!({
                "id": id,
                "outPath": path.basename(),
                "signatures": [],
                "dependentRealisations": {},
            });
            frame = frame.string(&id).string(&realisation.to_string());
        }
    }
    frame
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const PATH: &str = "/nix/store/g1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q-foo";
    const DRV: &str = "/nix/store/g1w7hy3qg1w7hy3qg1w7hy3qg1w7hy3q-foo.drv";

    #[test]
    fn derived_paths_parse_in_their_three_forms() {
        assert!(matches!(
            DerivedPath::parse(PATH).unwrap(),
            DerivedPath::Opaque(_)
        ));
        let all = DerivedPath::parse(&format!("{DRV}!*")).unwrap();
        assert!(matches!(
            &all,
            DerivedPath::Built {
                outputs: OutputsSpec::All,
                ..
            }
        ));
        assert_eq!(all.to_string(), format!("{DRV}!*"));
        let some = DerivedPath::parse(&format!("{DRV}!out,dev")).unwrap();
        assert_eq!(some.to_string(), format!("{DRV}!dev,out"));
        assert!(DerivedPath::parse(&format!("{PATH}!out")).is_err());
        assert!(DerivedPath::parse(&format!("{DRV}!")).is_err());
        assert!(DerivedPath::parse("/tmp/x").is_err());
    }

    #[tokio::test]
    async fn path_infos_round_trip() {
        let info = WirePathInfo {
            path: StorePath::from_absolute_path(PATH).unwrap(),
            deriver: Some(StorePath::from_absolute_path(DRV).unwrap()),
            nar_sha256: [7; 32],
            references: [StorePath::from_absolute_path(PATH).unwrap()].into(),
            registration_time: 12,
            nar_size: 120,
            ultimate: false,
            signatures: vec!["cache:abc".into()],
            ca: String::new(),
        };
        let bytes = write_path_info(Frame::new().string(PATH), &info).into_bytes();
        let mut r = WireReader::new(&bytes[..]);
        assert_eq!(read_path_info(&mut r).await.unwrap(), info);
    }

    #[tokio::test]
    async fn a_bad_path_in_a_path_info_is_a_value_error_after_the_whole_value() {
        let bytes = Frame::new()
            .string("/tmp/not-a-store-path")
            .string("")
            .string(&hex::encode([0u8; 32]))
            .strings(Vec::<String>::new())
            .u64(0)
            .u64(0)
            .bool(false)
            .strings(Vec::<String>::new())
            .string("")
            .u64(99)
            .into_bytes();
        let mut r = WireReader::new(&bytes[..]);
        let err = read_path_info(&mut r).await.unwrap_err();
        assert!(
            matches!(err, ReadError::Value(ValueError::StorePath { .. })),
            "{err}"
        );
        // The stream is still in step: the next word is there.
        assert_eq!(r.u64("next").await.unwrap(), 99);
    }

    #[test]
    fn build_results_follow_the_version() {
        let result = BuildResult {
            status: BuildStatus::PermanentFailure,
            error: "no".into(),
            start_time: 1,
            stop_time: 2,
            built_outputs: BTreeMap::new(),
        };
        let v = |minor| ProtocolVersion { major: 1, minor };
        // status, message (8 + 8), then 4 words of timing, then the map.
        assert_eq!(
            write_build_result(Frame::new(), &result, v(34))
                .as_bytes()
                .len(),
            8 + 16 + 32 + 8
        );
        // 1.37 adds two optional durations, each a tag word.
        assert_eq!(
            write_build_result(Frame::new(), &result, v(37))
                .as_bytes()
                .len(),
            8 + 16 + 32 + 16 + 8
        );
    }
}
