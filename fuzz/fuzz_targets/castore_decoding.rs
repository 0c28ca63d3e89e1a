//! Arbitrary bytes as castore messages, through decoding and validation:
//! must never panic.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    kiln::castore::wire::fuzz_entry(data);
});
