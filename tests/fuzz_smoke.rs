//! Drives the cargo-fuzz entry points (fuzz/) with deterministic random and
//! mutated inputs in the normal test run: decoding and validation of build
//! requests and castore messages never panic.

use kiln::proto::{snix_build, snix_castore};
use prost::Message;

/// xorshift64*: deterministic, so a failure reproduces.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

fn seeds() -> Vec<Vec<u8>> {
    let req = snix_build::BuildRequest {
        inputs: vec![snix_castore::Entry {
            entry: Some(snix_castore::entry::Entry::Directory(
                snix_castore::DirectoryEntry {
                    name: b"abc-busybox".to_vec().into(),
                    digest: vec![7; 32].into(),
                    size: 3,
                },
            )),
        }],
        command_args: vec!["/bin/sh".into(), "-c".into(), "true".into()],
        working_dir: "build".into(),
        scratch_paths: vec!["build".into(), "nix/store".into()],
        inputs_dir: "nix/store".into(),
        outputs: vec!["nix/store/x-out".into()],
        environment_vars: vec![snix_build::build_request::EnvVar {
            key: "out".into(),
            value: b"/nix/store/x-out".to_vec().into(),
        }],
        constraints: Some(snix_build::build_request::BuildConstraints {
            system: "x86_64-linux".into(),
            min_memory: 1 << 30,
            available_ro_paths: vec!["/dev/kvm".into()],
            network_access: false,
            provide_bin_sh: true,
        }),
        additional_files: vec![snix_build::build_request::AdditionalFile {
            path: "build/f".into(),
            contents: b"x".to_vec().into(),
        }],
        refscan_needles: vec!["x".into()],
    };
    let dir = snix_castore::Directory {
        directories: vec![],
        files: vec![snix_castore::FileEntry {
            name: b"f".to_vec().into(),
            digest: vec![1; 32].into(),
            size: 1,
            executable: true,
        }],
        symlinks: vec![snix_castore::SymlinkEntry {
            name: b"l".to_vec().into(),
            target: b"f".to_vec().into(),
        }],
    };
    vec![req.encode_to_vec(), dir.encode_to_vec(), Vec::new()]
}

#[test]
fn random_and_mutated_inputs_never_panic() {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    for seed in seeds() {
        kiln::grpc::request::fuzz_entry(&seed);
        kiln::castore::wire::fuzz_entry(&seed);
        for _ in 0..5000 {
            let mut data = seed.clone();
            let edits = 1 + rng.next() % 8;
            for _ in 0..edits {
                let r = rng.next();
                match r % 4 {
                    0 if !data.is_empty() => {
                        let i = (r >> 8) as usize % data.len();
                        data[i] = (r >> 32) as u8;
                    }
                    1 if !data.is_empty() => {
                        let i = (r >> 8) as usize % data.len();
                        data.truncate(i);
                    }
                    2 => data.push((r >> 16) as u8),
                    _ => {
                        if !data.is_empty() {
                            let i = (r >> 8) as usize % data.len();
                            data.insert(i, (r >> 40) as u8);
                        }
                    }
                }
            }
            kiln::grpc::request::fuzz_entry(&data);
            kiln::castore::wire::fuzz_entry(&data);
        }
    }
    for _ in 0..5000 {
        let len = (rng.next() % 256) as usize;
        let data: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
        kiln::grpc::request::fuzz_entry(&data);
        kiln::castore::wire::fuzz_entry(&data);
    }
}
