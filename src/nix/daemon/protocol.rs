//! The worker protocol's numbers: magic words, versions, operations, the
//! daemon's stderr frames, build statuses and the log's activity types.
//! Values from Nix's `worker-protocol.hh` and `logging.hh` (2.8 to 2.35).

/// The client's first word ("nixc").
pub const WORKER_MAGIC_1: u64 = 0x6e69_7863;
/// The daemon's answer ("dxio").
pub const WORKER_MAGIC_2: u64 = 0x6478_696f;

/// The oldest protocol kiln speaks: 1.34, Nix 2.8's.
pub const MIN_VERSION: ProtocolVersion = ProtocolVersion {
    major: 1,
    minor: 34,
};
/// The newest protocol kiln speaks: 1.37. Current Nix speaks 1.39 and
/// negotiates down to it (1.38 adds a feature exchange kiln does not need).
pub const MAX_VERSION: ProtocolVersion = ProtocolVersion {
    major: 1,
    minor: 37,
};

/// The Nix version kiln reports to clients of protocol 1.33 and later.
pub const DAEMON_NIX_VERSION: &str = concat!("2.8.0 (kiln ", env!("CARGO_PKG_VERSION"), ")");

/// A protocol version, `major << 8 | minor` on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ProtocolVersion {
    /// Always 1 so far.
    pub major: u8,
    /// What the protocol's features are gated on.
    pub minor: u8,
}

impl ProtocolVersion {
    /// From its wire form.
    pub fn from_wire(word: u64) -> Self {
        ProtocolVersion {
            major: ((word >> 8) & 0xff) as u8,
            minor: (word & 0xff) as u8,
        }
    }

    /// Its wire form.
    pub fn to_wire(self) -> u64 {
        u64::from(self.major) << 8 | u64::from(self.minor)
    }

    /// Whether this version is `minor` or later (within major 1).
    pub fn at_least(self, minor: u8) -> bool {
        self.minor >= minor
    }
}

impl std::fmt::Display for ProtocolVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// Frames the daemon sends while it works on a request.
pub mod stderr {
    /// A log message.
    pub const NEXT: u64 = 0x6f6c_6d67;
    /// The daemon wants data (only before 1.23).
    pub const READ: u64 = 0x6461_7461;
    /// Data for the client (only before 1.23).
    pub const WRITE: u64 = 0x6461_7416;
    /// The request is done; its result follows.
    pub const LAST: u64 = 0x616c_7473;
    /// The request failed; an error follows.
    pub const ERROR: u64 = 0x6378_7470;
    /// An activity (a build, a copy) starts.
    pub const START_ACTIVITY: u64 = 0x5354_5254;
    /// An activity ends.
    pub const STOP_ACTIVITY: u64 = 0x5354_4f50;
    /// An activity's result (a log line, a phase).
    pub const RESULT: u64 = 0x5253_4c54;
}

/// Activity types (`ActivityType`).
pub mod activity {
    /// A build of one derivation; fields: drv path, machine, round, rounds.
    pub const BUILD: u64 = 105;
}

/// Result types (`ResultType`).
pub mod result {
    /// One line of the builder's log; field: the line.
    pub const BUILD_LOG_LINE: u64 = 101;
}

/// Verbosity levels.
pub mod verbosity {
    /// Errors.
    pub const ERROR: u64 = 0;
    /// Informational messages (what a build activity is logged at).
    pub const INFO: u64 = 3;
}

macro_rules! ops {
    ($($(#[$doc:meta])* $name:ident = $value:literal,)*) => {
        /// The worker protocol's operations (`WorkerProto::Op`).
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        pub enum Op {
            $($(#[$doc])* $name = $value,)*
        }

        impl Op {
            /// The operation with this number, if there is one.
            pub fn from_wire(word: u64) -> Option<Op> {
                match word {
                    $($value => Some(Op::$name),)*
                    _ => None,
                }
            }

            /// Its name as Nix spells it (without the `wop` prefix).
            pub fn name(self) -> &'static str {
                match self {
                    $(Op::$name => stringify!($name),)*
                }
            }
        }
    };
}

ops! {
    /// Whether a path is valid.
    IsValidPath = 1,
    /// Obsolete.
    HasSubstitutes = 3,
    /// Obsolete.
    QueryPathHash = 4,
    /// Obsolete.
    QueryReferences = 5,
    /// Paths referring to a path.
    QueryReferrers = 6,
    /// Add a dump or a text as a content-addressed path.
    AddToStore = 7,
    /// Add a text (before 1.25).
    AddTextToStore = 8,
    /// Build derived paths.
    BuildPaths = 9,
    /// Make a path valid (substitute or build).
    EnsurePath = 10,
    /// A temporary GC root.
    AddTempRoot = 11,
    /// An indirect GC root.
    AddIndirectRoot = 12,
    /// Obsolete.
    SyncWithGC = 13,
    /// List GC roots.
    FindRoots = 14,
    /// Obsolete.
    ExportPath = 16,
    /// Obsolete.
    QueryDeriver = 18,
    /// The client's settings.
    SetOptions = 19,
    /// Garbage collection.
    CollectGarbage = 20,
    /// A substitute's path info.
    QuerySubstitutablePathInfo = 21,
    /// Obsolete.
    QueryDerivationOutputs = 22,
    /// Every valid path.
    QueryAllValidPaths = 23,
    /// Obsolete.
    QueryFailedPaths = 24,
    /// Obsolete.
    ClearFailedPaths = 25,
    /// A path's metadata.
    QueryPathInfo = 26,
    /// Obsolete.
    ImportPaths = 27,
    /// Obsolete.
    QueryDerivationOutputNames = 28,
    /// The path with this hash part.
    QueryPathFromHashPart = 29,
    /// Substitutes' path infos.
    QuerySubstitutablePathInfos = 30,
    /// Which of these paths are valid.
    QueryValidPaths = 31,
    /// Which paths have substitutes.
    QuerySubstitutablePaths = 32,
    /// Derivations producing a path.
    QueryValidDerivers = 33,
    /// Deduplicate the store.
    OptimiseStore = 34,
    /// Check the store.
    VerifyStore = 35,
    /// Build a derivation sent inline.
    BuildDerivation = 36,
    /// Add signatures to a path.
    AddSignatures = 37,
    /// A path as a NAR.
    NarFromPath = 38,
    /// Add a path with its metadata and NAR.
    AddToStoreNar = 39,
    /// What building these paths would take.
    QueryMissing = 40,
    /// A derivation's output map.
    QueryDerivationOutputMap = 41,
    /// Register a CA derivation's output.
    RegisterDrvOutput = 42,
    /// A CA derivation's output.
    QueryRealisation = 43,
    /// Add many paths in one framed stream.
    AddMultipleToStore = 44,
    /// Add a build log.
    AddBuildLog = 45,
    /// Build derived paths, one result each.
    BuildPathsWithResults = 46,
    /// A permanent GC root (1.36).
    AddPermRoot = 47,
}

/// `BuildResult::Status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BuildStatus {
    /// Built now.
    Built = 0,
    /// Substituted.
    Substituted = 1,
    /// Already valid; nothing built.
    AlreadyValid = 2,
    /// The builder failed.
    PermanentFailure = 3,
    /// An input was rejected.
    InputRejected = 4,
    /// An output was rejected (e.g. a fixed-output hash mismatch).
    OutputRejected = 5,
    /// Might succeed when retried.
    TransientFailure = 6,
    /// Cached failure.
    CachedFailure = 7,
    /// The build took too long or was silent too long.
    TimedOut = 8,
    /// Something else went wrong.
    MiscFailure = 9,
    /// A dependency failed.
    DependencyFailed = 10,
    /// The builder wrote too much log.
    LogLimitExceeded = 11,
    /// Two builds differed.
    NotDeterministic = 12,
    /// Resolved to valid paths.
    ResolvesToAlreadyValid = 13,
    /// No substituter could provide it.
    NoSubstituters = 14,
}

impl BuildStatus {
    /// Whether it counts as success.
    pub fn is_success(self) -> bool {
        matches!(
            self,
            BuildStatus::Built
                | BuildStatus::Substituted
                | BuildStatus::AlreadyValid
                | BuildStatus::ResolvesToAlreadyValid
        )
    }
}

/// Trust the daemon reports (1.35): `Some(true)` trusted, `Some(false)` not.
pub fn trust_word(trusted: Option<bool>) -> u64 {
    match trusted {
        None => 0,
        Some(true) => 1,
        Some(false) => 2,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_round_trip() {
        assert_eq!(MIN_VERSION.to_wire(), 0x122);
        assert_eq!(
            ProtocolVersion::from_wire(0x125),
            ProtocolVersion {
                major: 1,
                minor: 37
            }
        );
        assert!(ProtocolVersion::from_wire(0x122) < ProtocolVersion::from_wire(0x125));
        assert_eq!(MAX_VERSION.to_string(), "1.37");
    }

    #[test]
    fn ops_have_their_numbers_and_names() {
        assert_eq!(Op::from_wire(1), Some(Op::IsValidPath));
        assert_eq!(Op::from_wire(44).map(Op::name), Some("AddMultipleToStore"));
        assert_eq!(Op::from_wire(2), None);
        assert_eq!(Op::from_wire(48), None);
        assert_eq!(Op::BuildPathsWithResults as u64, 46);
    }

    #[test]
    fn stderr_words_spell_their_tags() {
        assert_eq!(&stderr::LAST.to_le_bytes()[..4], b"stla");
        assert_eq!(&stderr::NEXT.to_le_bytes()[..4], b"gmlo");
        assert_eq!(&WORKER_MAGIC_1.to_le_bytes()[..4], b"cxin");
    }
}
