//! Hashes of one file computed by other programs than kiln, pinned for the
//! tests of [`super`] and of [`crate::nix::fixed_output`].
//!
//! The file is `printf 'fixed\n' > fixed` (what `echo fixed > $out` in
//! `tests/fixtures/nix/conformance.nix` writes). With Nix 2.8 and GNU
//! coreutils, for each `A` of md5, sha1, sha256, sha512:
//!
//! - flat base16: `printf 'fixed\n' | Asum`, equal to `nix-hash --type A --flat fixed`;
//! - flat nixbase32: `nix-hash --type A --flat --base32 fixed`;
//! - recursive base16: `nix-store --dump fixed | Asum`, equal to `nix-hash --type A fixed`;
//! - recursive nixbase32: `nix-hash --type A --base32 fixed`;
//! - base64: `echo -n HEX | xxd -r -p | base64 -w0`, equal to the part after
//!   `A-` of `nix --extra-experimental-features nix-command hash to-sri --type A HEX`.

use super::HashAlgorithm;

/// The hashed file's contents.
pub(crate) const CONTENTS: &[u8] = b"fixed\n";

/// One digest in the three encodings (SRI is `<algorithm>-<base64>`).
pub(crate) struct Forms {
    pub(crate) base16: &'static str,
    pub(crate) nixbase32: &'static str,
    pub(crate) base64: &'static str,
}

/// The flat (file bytes) and recursive (NAR) hashes of [`CONTENTS`].
pub(crate) struct Vector {
    pub(crate) algorithm: HashAlgorithm,
    pub(crate) flat: Forms,
    pub(crate) recursive: Forms,
}

/// One [`Vector`] per algorithm.
pub(crate) const VECTORS: [Vector; 4] = [
    Vector {
        algorithm: HashAlgorithm::Md5,
        flat: Forms {
            base16: "708837c1d238f0955c23a38051f5ebb7",
            nixbase32: "5pxgsm30534df9bw1qsb0kg23h",
            base64: "cIg3wdI48JVcI6OAUfXrtw==",
        },
        recursive: Forms {
            base16: "873af0db21df5463e915efdde79ce79a",
            nixbase32: "4swyffgpgg2pln6m6z47dz0fl7",
            base64: "hzrw2yHfVGPpFe/d55znmg==",
        },
    },
    Vector {
        algorithm: HashAlgorithm::Sha1,
        flat: Forms {
            base16: "c06798cf02af363e9b65e98484ed4156b85fd5fc",
            nixbase32: "zkamzf2n87nq9179cndkwdmg0b7rhry0",
            base64: "wGeYzwKvNj6bZemEhO1BVrhf1fw=",
        },
        recursive: Forms {
            base16: "e65b7dcbd12458fbdc84b123ddad9b8ba06e2f96",
            nixbase32: "jqpnx84bkfnxs8xihkfgnn14s75psnz6",
            base64: "5lt9y9EkWPvchLEj3a2bi6BuL5Y=",
        },
    },
    Vector {
        algorithm: HashAlgorithm::Sha256,
        flat: Forms {
            base16: "0c3071418e6356e614898c84ed064ca95e88551bc0811b534bdf1952ecdae534",
            nixbase32: "0d75vbn546fz9d9ip0f03daqhpm99h3fv14ci4afcmk3ir0p2c0c",
            base64: "DDBxQY5jVuYUiYyE7QZMqV6IVRvAgRtTS98ZUuza5TQ=",
        },
        recursive: Forms {
            base16: "37ccfcce3135809b5003d8cdb7d07399d208dcd18ee7d74ce1ef7e892515c31f",
            nixbase32: "07y32ljqjzpgw56dgrwfs7f0illrfg8bgkfq0d89p01m677grk1p",
            base64: "N8z8zjE1gJtQA9jNt9BzmdII3NGO59dM4e9+iSUVwx8=",
        },
    },
    Vector {
        algorithm: HashAlgorithm::Sha512,
        flat: Forms {
            base16: "a3af15474dc10fb5000257d5166bd8920db49ab19a6ed573904a8e47425df6e2\
                     b30480d9964dbcba0adcff1d5675b8db0dc2a0acef794bdbdf258656884c719d",
            nixbase32: "2fp2k48as32bpyv9dwyzb50q86xpf3maqfzzp0apay4v5nrh02b7\
                        qpnbm14g3jaj1rxavlsn6db83cjv1midmap080ba3y19m3ibbx3",
            base64: "o68VR03BD7UAAlfVFmvYkg20mrGabtVzkEqOR0Jd9uKzBIDZlk28ugrc/x1WdbjbDcKgrO95S9vfJYZWiExxnQ==",
        },
        recursive: Forms {
            base16: "4b51bb4751426f4f6c25d321afbf934146458400e094f54203c45bd12b63449f\
                     c2ad6584932d4c386687ca30de7d2c3c78fe294ffef78cd0cc2e2001cf759ace",
            nixbase32: "379lxfg04h2xk6hikvzwkr9zrw3qb3xvqqcm1v67162v4w4cnnw57\
                        s4ccmx2ny40d1gb5700224aij1jfzsy8fk4mn4yvs2a53vnlab",
            base64: "S1G7R1FCb09sJdMhr7+TQUZFhADglPVCA8Rb0StjRJ/CrWWEky1MOGaHyjDefSw8eP4pT/73jNDMLiABz3Wazg==",
        },
    },
];
