//! What a client may send is bounded, checked over real gRPC against an
//! in-process server, without a VM or a kernel:
//! - requests whose paths overlap (nested outputs, outputs at or below an
//!   input, additional files in `inputs_dir`, a `working_dir` that would add
//!   a line to `/etc/passwd`) and needle caps: INVALID_ARGUMENT naming the
//!   field, for both build layouts;
//! - the request memory budget: RESOURCE_EXHAUSTED naming it;
//! - a long `DirectoryService.Put` stream is written in batches: the
//!   server's peak memory grows by far less than the stream.
//!
//! The server's VMM boots nothing, so a request these rules fail to refuse
//! cannot boot anything; it fails fast with another code.

#![allow(clippy::unwrap_used)]

mod harness;

use futures::StreamExt;
use kiln::castore::grpc_server::MAX_MESSAGE_SIZE;
use kiln::executor::admission::DEFAULT_REQUEST_BUDGET_BYTES;
use kiln::executor::request::{
    MAX_ADDITIONAL_FILES, MAX_REFSCAN_NEEDLES, MAX_REFSCAN_NEEDLES_BYTES,
};
use kiln::proto::{snix_build, snix_castore, tvix_build, tvix_castore};
use tonic::transport::Channel;
use tonic::Code;

use harness::{Options, TestServer};

const INPUT: &str = "0bcdfghijklmnpqrsvwxyz0123456789-busybox";
const OUT: &str = "nix/store/1bcdfghijklmnpqrsvwxyz0123456789-out";

/// The harness's server whose VMM boots nothing, with `budget` bytes for
/// all held requests.
async fn start(budget: usize) -> Server {
    let server = harness::server::start_without_vms(Options {
        request_budget_bytes: budget,
        ..Options::default()
    })
    .await;
    Server {
        channel: server.channel().await,
        _server: server,
    }
}

struct Server {
    channel: Channel,
    _server: TestServer,
}

impl Server {
    fn snix(&self) -> snix_build::build_service_client::BuildServiceClient<Channel> {
        snix_build::build_service_client::BuildServiceClient::new(self.channel.clone())
            .max_encoding_message_size(usize::MAX)
    }

    fn tvix(&self) -> tvix_build::build_service_client::BuildServiceClient<Channel> {
        tvix_build::build_service_client::BuildServiceClient::new(self.channel.clone())
    }
}

fn input_entry() -> snix_castore::Entry {
    snix_castore::Entry {
        entry: Some(snix_castore::entry::Entry::File(snix_castore::FileEntry {
            name: INPUT.as_bytes().to_vec().into(),
            digest: vec![1; 32].into(),
            size: 1,
            executable: true,
        })),
    }
}

fn file(path: &str, len: usize) -> snix_build::build_request::AdditionalFile {
    snix_build::build_request::AdditionalFile {
        path: path.into(),
        contents: vec![b'x'; len].into(),
    }
}

/// A Nix-shaped request; its input blob is not stored, so if it got past
/// validation it would fail at materialise (FAILED_PRECONDITION).
fn snix_request() -> snix_build::BuildRequest {
    snix_build::BuildRequest {
        inputs: vec![input_entry()],
        command_args: vec![format!("/nix/store/{INPUT}/bin/sh")],
        working_dir: "build".into(),
        scratch_paths: vec!["build".into(), "nix/store".into()],
        inputs_dir: "nix/store".into(),
        outputs: vec![OUT.into()],
        environment_vars: vec![],
        constraints: None,
        additional_files: vec![],
        refscan_needles: vec!["1bcdfghijklmnpqrsvwxyz0123456789".into()],
    }
}

type Case<R> = (&'static str, Box<dyn Fn(&mut R)>, &'static str);

#[tokio::test(flavor = "multi_thread")]
async fn overlapping_paths_and_needle_caps_are_invalid_over_snix() {
    let server = start(DEFAULT_REQUEST_BUDGET_BYTES).await;
    let cases: Vec<Case<snix_build::BuildRequest>> = vec![
        (
            "nested outputs",
            Box::new(|r| r.outputs = vec![OUT.into(), format!("{OUT}/sub")]),
            "outputs[1]",
        ),
        (
            "output at an input",
            Box::new(|r| r.outputs = vec![format!("nix/store/{INPUT}")]),
            "outputs[0]",
        ),
        (
            "output below an input",
            Box::new(|r| r.outputs = vec![format!("nix/store/{INPUT}/bin/x")]),
            "outputs[0]",
        ),
        (
            "additional file at an input",
            Box::new(|r| r.additional_files = vec![file(&format!("nix/store/{INPUT}"), 1)]),
            "additional_files[0].path",
        ),
        (
            "additional file under inputs_dir",
            Box::new(|r| r.additional_files = vec![file("nix/store/planted", 1)]),
            "additional_files[0].path",
        ),
        (
            "additional file below another",
            Box::new(|r| r.additional_files = vec![file("build/a", 1), file("build/a/b", 1)]),
            "additional_files[0].path",
        ),
        (
            "additional file at an output",
            Box::new(|r| r.additional_files = vec![file(OUT, 1)]),
            "additional_files[0].path",
        ),
        (
            "too many additional files",
            Box::new(|r| {
                r.additional_files = (0..=MAX_ADDITIONAL_FILES)
                    .map(|i| file(&format!("build/{i:05}"), 0))
                    .collect()
            }),
            "additional_files",
        ),
        (
            "newline in working_dir",
            Box::new(|r| r.working_dir = "build/x\nevil::0:0::/:/bin/sh".into()),
            "working_dir",
        ),
        (
            "colon in working_dir",
            Box::new(|r| r.working_dir = "build/a:b".into()),
            "working_dir",
        ),
        (
            "too many needles",
            Box::new(|r| {
                r.refscan_needles = (0..=MAX_REFSCAN_NEEDLES)
                    .map(|i| format!("{i:032}"))
                    .collect()
            }),
            "refscan_needles",
        ),
        (
            "needles too long in all",
            Box::new(|r| r.refscan_needles = vec!["n".repeat(MAX_REFSCAN_NEEDLES_BYTES + 1)]),
            "refscan_needles",
        ),
    ];
    let mut client = server.snix();
    for (what, mutate, field) in &cases {
        let mut req = snix_request();
        mutate(&mut req);
        let status = client.do_build(req).await.expect_err(what);
        assert_eq!(status.code(), Code::InvalidArgument, "{what}: {status:?}");
        assert!(
            status.message().contains(&format!("{field}: ")),
            "{what}: message {:?} should name {field:?}",
            status.message()
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_output_at_an_input_is_invalid_over_tvix() {
    let server = start(DEFAULT_REQUEST_BUDGET_BYTES).await;
    let input = tvix_castore::Node {
        node: Some(tvix_castore::node::Node::File(tvix_castore::FileNode {
            name: INPUT.as_bytes().to_vec().into(),
            digest: vec![1; 32].into(),
            size: 1,
            executable: true,
        })),
    };
    let req = tvix_build::BuildRequest {
        command_args: vec![format!("/nix/store/{INPUT}/bin/sh")],
        outputs: vec![INPUT.into()],
        environment_vars: vec![],
        inputs: vec![input],
        constraints: None,
    };
    let status = server.tvix().do_build(req).await.expect_err("refused");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("outputs[0]: "), "{status:?}");
    assert!(status.message().contains("read-only"), "{status:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn requests_over_the_memory_budget_are_refused() {
    let server = start(64 * 1024).await;
    let mut req = snix_request();
    req.additional_files = vec![file("build/.attr-big", 100 * 1024)];
    let status = server.snix().do_build(req).await.expect_err("over budget");
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status
            .message()
            .contains("request memory budget of 65536 bytes"),
        "{status:?}"
    );
    // A small request still passes the budget (and fails later, at
    // materialise, since its input is not stored).
    let status = server
        .snix()
        .do_build(snix_request())
        .await
        .expect_err("no input");
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
}

/// Peak resident memory of this process, KiB.
fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// Leaf directory `d` with `entries` files: about 60 bytes per entry encoded.
fn leaf(d: usize, entries: usize) -> snix_castore::Directory {
    snix_castore::Directory {
        files: (0..entries)
            .map(|i| snix_castore::FileEntry {
                name: format!("{d:06}-{i:05}").into_bytes().into(),
                digest: blake3::hash(format!("{d}/{i}").as_bytes())
                    .as_bytes()
                    .to_vec()
                    .into(),
                size: i as u64,
                executable: false,
            })
            .collect(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_long_directory_put_is_written_in_batches() {
    use snix_castore::directory_service_client::DirectoryServiceClient;
    const STREAM_MIB: usize = 160;
    const ENTRIES: usize = 1000;
    let server = start(DEFAULT_REQUEST_BUDGET_BYTES).await;
    let per_dir = prost::Message::encoded_len(&leaf(0, ENTRIES));
    let count = STREAM_MIB * 1024 * 1024 / per_dir;
    let mut client = DirectoryServiceClient::new(server.channel.clone())
        .max_encoding_message_size(MAX_MESSAGE_SIZE);
    let before = peak_rss_kib();
    let stream = futures::stream::iter(0..count).map(|d| leaf(d, ENTRIES));
    let answer = client.put(stream).await.unwrap().into_inner();
    let grown_mib = (peak_rss_kib() - before) / 1024;
    eprintln!("peak memory grew by {grown_mib} MiB for a {STREAM_MIB} MiB stream");
    let last = kiln::castore::Directory::try_from(leaf(count - 1, ENTRIES)).unwrap();
    assert_eq!(answer.root_digest, last.digest().to_bytes());
    assert!(
        grown_mib < STREAM_MIB as u64 / 2,
        "peak memory grew by {grown_mib} MiB while {STREAM_MIB} MiB of directories were streamed in"
    );
    // Every batch was stored, not only the last.
    let first = kiln::castore::Directory::try_from(leaf(0, ENTRIES)).unwrap();
    let got = client
        .get(snix_castore::GetDirectoryRequest {
            by_what: Some(snix_castore::get_directory_request::ByWhat::Digest(
                first.digest().to_bytes(),
            )),
            recursive: false,
        })
        .await
        .unwrap()
        .into_inner()
        .message()
        .await
        .unwrap();
    assert!(got.is_some(), "the first directory is stored");
}
