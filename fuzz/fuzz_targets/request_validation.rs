//! Arbitrary bytes as a build request of either layout, through decoding and
//! validation: must never panic.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    kiln::grpc::request::fuzz_entry(data);
});
