//! Structured attributes (`__structuredAttrs = true`): instead of
//! environment variables, Nix 2.8 hands the builder the derivation's
//! attributes as `/build/.attrs.json` (the `__json` attribute plus an
//! `outputs` object mapping output names to paths, keys sorted, compact) and
//! `/build/.attrs.sh` (the same as bash `declare` statements, for the values
//! a shell can hold).
//!
//! One deliberate difference: Nix 2.8 points `NIX_ATTRS_JSON_FILE` and
//! `NIX_ATTRS_SH_FILE` at its *host* temporary directory
//! (`/tmp/nix-build-<name>.drv-0/…`), which does not exist inside its own
//! sandbox; kiln points them at the files in `/build`, as later Nix does.

use std::collections::BTreeMap;

use serde_json::Value;

use super::store_path::StorePath;

/// Why the structured attributes cannot be handed over.
#[derive(Debug, thiserror::Error)]
pub enum StructuredAttrsError {
    /// `__json` is not a JSON object.
    #[error("__json is not a JSON object")]
    NotAnObject,
    /// `__json` is not valid JSON.
    #[error("__json is not valid JSON")]
    Json(#[source] serde_json::Error),
    /// `exportReferencesGraph` needs the closure's registration info,
    /// which kiln does not produce.
    #[error("exportReferencesGraph is not supported")]
    ExportReferencesGraph,
}

/// The two files' contents.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttrsFiles {
    /// `.attrs.json`.
    pub json: Vec<u8>,
    /// `.attrs.sh`.
    pub sh: Vec<u8>,
}

/// Builds `.attrs.json` and `.attrs.sh` from the `__json` attribute and the
/// output paths by name.
pub fn attrs_files(
    json: &[u8],
    outputs: &BTreeMap<String, StorePath>,
) -> Result<AttrsFiles, StructuredAttrsError> {
    let mut attrs = match serde_json::from_slice(json).map_err(StructuredAttrsError::Json)? {
        Value::Object(map) => map,
        _ => return Err(StructuredAttrsError::NotAnObject),
    };
    if attrs.contains_key("exportReferencesGraph") {
        return Err(StructuredAttrsError::ExportReferencesGraph);
    }
    let outputs = outputs
        .iter()
        .map(|(name, path)| (name.clone(), Value::String(path.to_string())))
        .collect();
    attrs.insert("outputs".to_owned(), Value::Object(outputs));
    let attrs = Value::Object(attrs);
    let mut json = String::new();
    dump(&attrs, &mut json);
    Ok(AttrsFiles {
        json: json.into_bytes(),
        sh: shell(&attrs).into_bytes(),
    })
}

/// Compact JSON with object keys sorted, as Nix's JSON library writes it.
fn dump(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, key) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(key.clone()).to_string());
                out.push(':');
                if let Some(v) = map.get(key) {
                    dump(v, out);
                }
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                dump(item, out);
            }
            out.push(']');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

/// `declare` statements for every attribute whose name is a shell variable
/// name and whose value is a scalar, or a list or object of scalars.
fn shell(attrs: &Value) -> String {
    let Value::Object(map) = attrs else {
        return String::new();
    };
    let mut keys: Vec<&String> = map.keys().collect();
    keys.sort();
    let mut out = String::new();
    for key in keys.into_iter().filter(|k| is_shell_name(k)) {
        let Some(value) = map.get(key) else { continue };
        if let Some(s) = scalar(value) {
            out.push_str(&format!("declare {key}={s}\n"));
        } else if let Value::Array(items) = value {
            let items: Option<Vec<String>> = items.iter().map(scalar).collect();
            if let Some(items) = items {
                let body: String = items.iter().map(|s| format!("{s} ")).collect();
                out.push_str(&format!("declare -a {key}=({body})\n"));
            }
        } else if let Value::Object(inner) = value {
            let mut names: Vec<&String> = inner.keys().collect();
            names.sort();
            let items: Option<Vec<String>> = names
                .iter()
                .map(|n| Some(format!("[{}]={} ", quote(n), scalar(inner.get(*n)?)?)))
                .collect();
            if let Some(items) = items {
                out.push_str(&format!("declare -A {key}=({})\n", items.concat()));
            }
        }
    }
    out
}

/// A scalar as Nix 2.8 writes it for the shell: strings quoted, integral
/// numbers as integers, `true` as `1`, `false` and `null` as empty; other
/// numbers are not representable.
fn scalar(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(quote(s)),
        Value::Number(n) => match n.as_i64() {
            Some(i) => Some(i.to_string()),
            None => n
                .as_f64()
                .filter(|f| f.fract() == 0.0)
                .map(|f| format!("{}", f as i64)),
        },
        Value::Null => Some("''".to_owned()),
        Value::Bool(true) => Some("1".to_owned()),
        Value::Bool(false) => Some(String::new()),
        Value::Array(_) | Value::Object(_) => None,
    }
}

/// Single-quotes for the shell: `it's` becomes `'it'\''s'`.
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

fn is_shell_name(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly on purpose
mod tests {
    use super::*;

    #[test]
    fn matches_what_nix_2_8_wrote() {
        // From a build with Nix 2.8 here (attributes list, num, flag, nested, str).
        let json = br#"{"builder":"/nix/store/ky1751a7z5nxdxdiaq44ps81zs13fdya-busybox-static/bin/busybox","flag":true,"list":["a","b c"],"name":"sa","nested":{"x":1},"num":3,"str":"it's","system":"x86_64-linux"}"#;
        let out: StorePath = "/nix/store/mcmk3c7kmc709fi3xg9qnsam75lvib4p-sa"
            .parse()
            .unwrap();
        let files = attrs_files(json, &BTreeMap::from([("out".to_owned(), out)])).unwrap();
        assert_eq!(
            String::from_utf8(files.json).unwrap(),
            r#"{"builder":"/nix/store/ky1751a7z5nxdxdiaq44ps81zs13fdya-busybox-static/bin/busybox","flag":true,"list":["a","b c"],"name":"sa","nested":{"x":1},"num":3,"outputs":{"out":"/nix/store/mcmk3c7kmc709fi3xg9qnsam75lvib4p-sa"},"str":"it's","system":"x86_64-linux"}"#
        );
        assert_eq!(
            String::from_utf8(files.sh).unwrap(),
            "declare builder='/nix/store/ky1751a7z5nxdxdiaq44ps81zs13fdya-busybox-static/bin/busybox'\n\
             declare flag=1\n\
             declare -a list=('a' 'b c' )\n\
             declare name='sa'\n\
             declare -A nested=(['x']=1 )\n\
             declare num=3\n\
             declare -A outputs=(['out']='/nix/store/mcmk3c7kmc709fi3xg9qnsam75lvib4p-sa' )\n\
             declare str='it'\\''s'\n\
             declare system='x86_64-linux'\n"
        );
    }

    #[test]
    fn skips_what_a_shell_cannot_hold() {
        let json = br#"{"deep":[[1]],"half":1.5,"bad-name":1,"nil":null,"no":false}"#;
        let files = attrs_files(json, &BTreeMap::new()).unwrap();
        assert_eq!(
            String::from_utf8(files.sh).unwrap(),
            "declare nil=''\ndeclare no=\ndeclare -A outputs=()\n"
        );
        assert!(attrs_files(b"[1]", &BTreeMap::new()).is_err());
        assert!(attrs_files(b"{", &BTreeMap::new()).is_err());
        assert!(attrs_files(br#"{"exportReferencesGraph":{}}"#, &BTreeMap::new()).is_err());
    }
}
