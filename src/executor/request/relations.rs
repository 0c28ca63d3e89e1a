//! Rules relating several fields of a [`BuildRequest`], checked once every
//! field is valid on its own.
//!
//! The sandbox's layout must be one tree the agent can build without
//! surprises, so paths may not overlap where an overlap would make one thing
//! hide or pre-seed another:
//! - an output inside another output would come back twice (and the inner
//!   one empty once the outer is moved into the store);
//! - an output at or below an input (`/<inputs_dir>/<name>`) or containing
//!   `inputs_dir` names read-only input bytes, not build results;
//! - an additional file may not lie in `inputs_dir` (the read-only inputs
//!   mount), nor at or above a scratch path, `inputs_dir`, the working dir or
//!   another additional file (it would stand where a directory must be), nor
//!   at, above or below an output (it would pre-seed the output; Nix puts
//!   `passAsFile` files in `build/` and outputs in `nix/store`, so no Nix
//!   request does this).
//!
//! Overlaps are found with byte-sorted lists and binary search (all paths
//! below `p` sort together, right after `p/`), so a request with many paths
//! costs `n log n`, never `n²`.

use std::collections::BTreeSet;

use super::{
    BuildRequest, MAX_ADDITIONAL_FILES, MAX_ADDITIONAL_FILES_BYTES, MAX_ARGS_ENV_TOTAL,
    MAX_ARG_STRLEN, MAX_REFSCAN_NEEDLES, MAX_REFSCAN_NEEDLES_BYTES,
};
use crate::executor::error::{invalid, InvalidRequest};
use crate::executor::paths::RelPath;

impl BuildRequest {
    /// Rules that relate several fields.
    pub(crate) fn check_relations(&self) -> Result<(), InvalidRequest> {
        self.check_command()?;
        self.check_working_dir()?;
        let outputs = Sorted::new(&self.outputs);
        self.check_outputs(&outputs)?;
        self.check_additional_files(&outputs)?;
        self.check_needles()
    }

    /// The command, `argv0` and the environment: what `execve` copies onto
    /// the builder's stack. With `argv0` set, `command_args[0]` still counts:
    /// the kernel copies the executed path there too (`AT_EXECFN`).
    pub(super) fn check_command(&self) -> Result<(), InvalidRequest> {
        if self.command_args.is_empty() || self.command_args[0].is_empty() {
            return Err(invalid(
                "command_args",
                "must name a program to run (argv[0] is empty)",
            ));
        }
        let mut total = 0usize;
        let argv0 = self.argv0.iter().map(|a| ("argv0".to_owned(), a));
        let args = self
            .command_args
            .iter()
            .enumerate()
            .map(|(i, a)| (format!("command_args[{i}]"), a));
        for (field, a) in args.chain(argv0) {
            if a.contains('\0') {
                return Err(invalid(field, "contains a NUL byte"));
            }
            if a.len() >= MAX_ARG_STRLEN {
                return Err(invalid(
                    field,
                    format!("{} bytes, over the {MAX_ARG_STRLEN}-byte limit Linux sets for one argument", a.len()),
                ));
            }
            total += a.len() + 1;
        }
        if self.argv0.as_ref().is_some_and(String::is_empty) {
            return Err(invalid(
                "argv0",
                "is empty; leave it unset to run with argv[0] = command_args[0]",
            ));
        }
        total += self
            .environment_vars
            .iter()
            .map(|e| e.key.len() + e.value.len() + 2)
            .sum::<usize>();
        if total > MAX_ARGS_ENV_TOTAL {
            return Err(invalid(
                "environment_vars",
                format!("arguments and environment take {total} bytes, over the {MAX_ARGS_ENV_TOTAL}-byte limit"),
            ));
        }
        Ok(())
    }

    /// The working dir becomes the build user's home in the guest's
    /// `/etc/passwd`, a file of `:`-separated fields, one line per user.
    fn check_working_dir(&self) -> Result<(), InvalidRequest> {
        let dir = self.working_dir.as_str();
        if let Some(c) = dir.chars().find(|c| c.is_control() || *c == ':') {
            return Err(invalid(
                "working_dir",
                format!("{dir:?} contains {c:?}; it is written into /etc/passwd, where a newline, control character or `:` would change the entries"),
            ));
        }
        Ok(())
    }

    fn check_outputs(&self, outputs: &Sorted<'_>) -> Result<(), InvalidRequest> {
        let mut seen = BTreeSet::new();
        for (i, o) in self.outputs.iter().enumerate() {
            let field = || format!("outputs[{i}]");
            if !self.in_scratch(o) {
                return Err(invalid(
                    field(),
                    format!("{o:?} is not inside any scratch path"),
                ));
            }
            if self.scratch_paths.contains(o) {
                return Err(invalid(field(), format!("{o:?} is a scratch path itself")));
            }
            if !seen.insert(o) {
                return Err(invalid(field(), format!("{o:?} is listed twice")));
            }
            if let Some(j) = outputs.below(o.as_str()) {
                return Err(invalid(
                    format!("outputs[{j}]"),
                    format!(
                        "{:?} lies inside outputs[{i}] {o:?}; one output cannot contain another",
                        self.outputs[j]
                    ),
                ));
            }
            self.check_output_against_inputs(o)
                .map_err(|rule| invalid(field(), rule))?;
        }
        Ok(())
    }

    /// Outputs must be build results, never (part of) the read-only inputs.
    fn check_output_against_inputs(&self, o: &RelPath) -> Result<(), String> {
        if self.inputs_dir.is_within(o) {
            return Err(format!(
                "{o:?} contains inputs_dir {:?}, the read-only inputs",
                self.inputs_dir
            ));
        }
        let Some(name) = o
            .as_str()
            .strip_prefix(self.inputs_dir.as_str())
            .and_then(|rest| rest.strip_prefix('/'))
            .and_then(|rest| rest.split('/').next())
        else {
            return Ok(());
        };
        let is_input = self
            .inputs
            .binary_search_by(|(n, _)| n.as_bytes().cmp(name.as_bytes()))
            .is_ok();
        if is_input {
            return Err(format!(
                "{o:?} is at or below input {name:?} (/{}/{name}), which is read-only",
                self.inputs_dir
            ));
        }
        Ok(())
    }

    fn check_additional_files(&self, outputs: &Sorted<'_>) -> Result<(), InvalidRequest> {
        let count = self.additional_files.len();
        if count > MAX_ADDITIONAL_FILES {
            return Err(invalid(
                "additional_files",
                format!("{count} files, over the limit of {MAX_ADDITIONAL_FILES}"),
            ));
        }
        let scratch = Sorted::new(&self.scratch_paths);
        let files = Sorted::new(self.additional_files.iter().map(|f| &f.path));
        let mut seen = BTreeSet::new();
        let mut total = 0usize;
        for (i, f) in self.additional_files.iter().enumerate() {
            let field = || format!("additional_files[{i}].path");
            let path = &f.path;
            if !self.in_scratch(path) {
                return Err(invalid(
                    field(),
                    format!("{path:?} is not inside any scratch path"),
                ));
            }
            if !seen.insert(path) {
                return Err(invalid(field(), format!("{path:?} is listed twice")));
            }
            self.check_file_placement(path, &scratch, &files, outputs)
                .map_err(|rule| invalid(field(), rule))?;
            total += f.contents.len();
        }
        if total > MAX_ADDITIONAL_FILES_BYTES {
            return Err(invalid(
                "additional_files",
                format!("{total} bytes in all, over the {MAX_ADDITIONAL_FILES_BYTES}-byte limit"),
            ));
        }
        // An additional file inside an output would pre-seed it.
        for (i, o) in self.outputs.iter().enumerate() {
            if let Some(j) = files.below(o.as_str()) {
                return Err(invalid(
                    format!("additional_files[{j}].path"),
                    format!(
                        "{:?} lies inside outputs[{i}] {o:?}; outputs are made by the build alone",
                        self.additional_files[j].path
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Where one additional file may not be (see the module docs).
    fn check_file_placement(
        &self,
        path: &RelPath,
        scratch: &Sorted<'_>,
        files: &Sorted<'_>,
        outputs: &Sorted<'_>,
    ) -> Result<(), String> {
        if path.is_within(&self.inputs_dir) || self.inputs_dir.is_within(path) {
            return Err(format!(
                "{path:?} overlaps inputs_dir {:?}, the read-only inputs",
                self.inputs_dir
            ));
        }
        if let Some(j) = scratch.at_or_below(path.as_str()) {
            return Err(format!(
                "{path:?} would stand where scratch directory {:?} must be",
                self.scratch_paths[j]
            ));
        }
        if self.working_dir.is_within(path) {
            return Err(format!(
                "{path:?} would stand where working_dir {:?} must be",
                self.working_dir
            ));
        }
        if let Some(j) = files.below(path.as_str()) {
            return Err(format!(
                "{path:?} would stand where the directory of additional_files[{j}] {:?} must be",
                self.additional_files[j].path
            ));
        }
        if let Some(j) = outputs.at_or_below(path.as_str()) {
            return Err(format!(
                "{path:?} is at or above outputs[{j}] {:?}; outputs are made by the build alone",
                self.outputs[j]
            ));
        }
        Ok(())
    }

    fn check_needles(&self) -> Result<(), InvalidRequest> {
        let count = self.refscan_needles.len();
        if count > MAX_REFSCAN_NEEDLES {
            return Err(invalid(
                "refscan_needles",
                format!("{count} needles, over the limit of {MAX_REFSCAN_NEEDLES}"),
            ));
        }
        let mut total = 0usize;
        for (i, n) in self.refscan_needles.iter().enumerate() {
            if n.is_empty() {
                return Err(invalid(format!("refscan_needles[{i}]"), "is empty"));
            }
            total += n.len();
        }
        if total > MAX_REFSCAN_NEEDLES_BYTES {
            return Err(invalid(
                "refscan_needles",
                format!("{total} bytes in all, over the {MAX_REFSCAN_NEEDLES_BYTES}-byte limit"),
            ));
        }
        Ok(())
    }

    fn in_scratch(&self, p: &RelPath) -> bool {
        self.scratch_paths.iter().any(|s| p.is_within(s))
    }
}

/// Paths sorted by their bytes, each with its index in the request.
struct Sorted<'a>(Vec<(&'a str, usize)>);

impl<'a> Sorted<'a> {
    fn new(paths: impl IntoIterator<Item = &'a RelPath>) -> Self {
        let mut sorted: Vec<_> = paths
            .into_iter()
            .enumerate()
            .map(|(i, p)| (p.as_str(), i))
            .collect();
        sorted.sort_unstable();
        Self(sorted)
    }

    /// The request index of a path strictly below `base`, if any. Every
    /// string starting with `base/` sorts in one run, from the first string
    /// not less than `base/`.
    fn below(&self, base: &str) -> Option<usize> {
        let prefix = format!("{base}/");
        let first = self.0.partition_point(|(p, _)| *p < prefix.as_str());
        self.0
            .get(first)
            .filter(|(p, _)| p.starts_with(&prefix))
            .map(|(_, i)| *i)
    }

    /// The request index of a path equal to `base` or below it, if any.
    fn at_or_below(&self, base: &str) -> Option<usize> {
        match self.0.binary_search_by(|(p, _)| (*p).cmp(base)) {
            Ok(k) => Some(self.0[k].1),
            Err(_) => self.below(base),
        }
    }
}

#[cfg(test)]
mod tests;
