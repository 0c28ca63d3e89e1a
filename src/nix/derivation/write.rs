//! The ATerm writer: a [`Derivation`] back in the exact bytes Nix writes
//! (maps in their sorted order, strings with Nix's five escapes), so a parsed
//! file is reproduced byte for byte.

use super::Derivation;
use crate::nix::store_path::StorePath;

impl Derivation {
    /// Writes the derivation back in Nix's ATerm form.
    pub fn to_aterm(&self) -> Vec<u8> {
        self.write_aterm(
            self.input_derivations
                .iter()
                .map(|(drv, outputs)| (drv.to_string(), outputs)),
        )
    }

    /// The ATerm with `inputs` (in the order given) as its input
    /// derivations, as `hashDerivationModulo` writes it with each input's
    /// hash in place of its path.
    pub(super) fn to_aterm_with_inputs(
        &self,
        inputs: &std::collections::BTreeMap<String, std::collections::BTreeSet<String>>,
    ) -> Vec<u8> {
        self.write_aterm(inputs.iter().map(|(key, outputs)| (key.clone(), outputs)))
    }

    fn write_aterm<'a>(
        &self,
        inputs: impl Iterator<Item = (String, &'a std::collections::BTreeSet<String>)>,
    ) -> Vec<u8> {
        let mut w = Vec::new();
        w.extend_from_slice(b"Derive([");
        for (i, (name, out)) in self.outputs.iter().enumerate() {
            comma(&mut w, i);
            w.push(b'(');
            let path = out.path.as_ref().map(StorePath::to_string);
            write_strings(
                &mut w,
                [
                    name.as_bytes(),
                    path.as_deref().unwrap_or("").as_bytes(),
                    out.hash_algorithm.as_bytes(),
                    out.hash.as_bytes(),
                ],
            );
            w.push(b')');
        }
        w.extend_from_slice(b"],[");
        for (i, (drv, outputs)) in inputs.enumerate() {
            comma(&mut w, i);
            w.push(b'(');
            write_string(&mut w, drv.as_bytes());
            w.extend_from_slice(b",[");
            write_strings(&mut w, outputs.iter().map(|o| o.as_bytes()));
            w.extend_from_slice(b"])");
        }
        w.extend_from_slice(b"],[");
        let sources: Vec<String> = self.input_sources.iter().map(|s| s.to_string()).collect();
        write_strings(&mut w, sources.iter().map(|s| s.as_bytes()));
        w.extend_from_slice(b"],");
        write_strings(&mut w, [self.system.as_bytes(), self.builder.as_bytes()]);
        w.extend_from_slice(b",[");
        write_strings(&mut w, self.arguments.iter().map(|a| a.as_bytes()));
        w.extend_from_slice(b"],[");
        for (i, (key, value)) in self.environment.iter().enumerate() {
            comma(&mut w, i);
            w.push(b'(');
            write_strings(&mut w, [key.as_bytes(), value.as_slice()]);
            w.push(b')');
        }
        w.extend_from_slice(b"])");
        w
    }
}

fn comma(w: &mut Vec<u8>, index: usize) {
    if index > 0 {
        w.push(b',');
    }
}

fn write_strings<'a>(w: &mut Vec<u8>, strings: impl IntoIterator<Item = &'a [u8]>) {
    for (i, s) in strings.into_iter().enumerate() {
        comma(w, i);
        write_string(w, s);
    }
}

fn write_string(w: &mut Vec<u8>, s: &[u8]) {
    w.push(b'"');
    for &b in s {
        match b {
            b'"' => w.extend_from_slice(b"\\\""),
            b'\\' => w.extend_from_slice(b"\\\\"),
            b'\n' => w.extend_from_slice(b"\\n"),
            b'\r' => w.extend_from_slice(b"\\r"),
            b'\t' => w.extend_from_slice(b"\\t"),
            _ => w.push(b),
        }
    }
    w.push(b'"');
}
