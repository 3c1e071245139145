//! Bounds on untrusted input, checked in one linear pass before any parser sees it, so
//! that every input costs time and memory in proportion to its size and a hostile or
//! broken one is rejected with a reason instead of pinning a CPU or exhausting memory.
//!
//! **Every input path must pass its input through one of these checks before parsing
//! it**: [`check_yaml`](check_yaml) for YAML or JSON text (the manifest
//! directory), [`check_json`](check_json) for JSON bytes (AdmissionReview
//! bodies; in Kubernetes mode, any API response read raw), and
//! [`check_value`](check_value) for an object another library already decoded
//! (in Kubernetes mode, what a kube-runtime watcher yields, before the index sees it).
//!
//! Why parsers need this: libyaml (under `serde_yaml_ng`) scans nested flow collections
//! in time quadratic in their depth (100,000 `[` keep a CPU busy for minutes) before
//! `serde_yaml_ng`'s recursion limit applies, and `serde_yaml_ng` expands aliases far
//! past its own repetition limit (a 50 KB text expands to 10^8 nodes).

use serde::de::{
    DeserializeSeed, Deserializer, EnumAccess, MapAccess, SeqAccess, VariantAccess, Visitor,
};

use super::CrdError;

/// Largest manifest file: room for a bundle of many objects (CRD bundles run to a
/// few MiB), small enough to parse in a fraction of a second.
pub const MAX_FILE_BYTES: usize = 16 << 20;
/// Largest document (one object): the API server rejects request bodies over 3 MiB
/// (and etcd objects over 1.5 MiB), so no real object's manifest is larger.
pub const MAX_DOCUMENT_BYTES: usize = 3 << 20;
/// Deepest nesting of collections: real objects stay under 30 levels (Gateway API
/// CRD schemas, among the deepest, reach 26); serde's own recursion limit is 128.
pub const MAX_NESTING: usize = 64;
/// How many times its length a YAML text may grow to when its aliases are expanded
/// (counting nodes plus scalar bytes); alias-free YAML stays under 1.5.
pub const ALIAS_EXPANSION_FACTOR: usize = 2;
/// Expansion allowed on top of [`ALIAS_EXPANSION_FACTOR`], so short texts may reuse
/// an anchor freely.
pub const ALIAS_EXPANSION_ALLOWANCE: usize = 64 << 10;
/// libyaml forgets a possible simple key after this many bytes.
const SIMPLE_KEY_SPAN: usize = 1024;

/// A size for people: `3.0 MiB`.
pub(crate) fn mib(bytes: usize) -> String {
    format!("{:.1} MiB", bytes as f64 / f64::from(1 << 20))
}

fn too_deep(line: usize, column: usize) -> CrdError {
    CrdError::TooDeep {
        limit: MAX_NESTING,
        at: format!("at line {line} column {column}"),
    }
}

/// Checks a manifest file's size (in bytes) before it is read.
pub fn check_file_size(size: u64) -> Result<(), CrdError> {
    if size > MAX_FILE_BYTES as u64 {
        return Err(CrdError::TooLarge {
            what: format!(
                "the file ({})",
                mib(usize::try_from(size).unwrap_or(usize::MAX))
            ),
            limit: MAX_FILE_BYTES,
        });
    }
    Ok(())
}

/// Checks a YAML (or JSON) text of one or more documents: its size and each
/// document's, the nesting of block and flow collections, and how far its aliases
/// expand. Linear in the text's length.
pub fn check_yaml(text: &str) -> Result<(), CrdError> {
    check_file_size(text.len() as u64)?;
    Scanner::new(text.as_bytes(), MAX_NESTING).run()?;
    // Without both an anchor sign and an alias sign there is nothing to expand; the
    // check does not rely on the scanner finding every alias.
    if text.contains('&') && text.contains('*') {
        check_alias_expansion(text)?;
    }
    Ok(())
}

/// Checks JSON bytes: at most `max_bytes` long, nested at most [`MAX_NESTING`] deep.
pub fn check_json(input: &[u8], max_bytes: usize) -> Result<(), CrdError> {
    if input.len() > max_bytes {
        return Err(CrdError::TooLarge {
            what: format!("the JSON body ({})", mib(input.len())),
            limit: max_bytes,
        });
    }
    let (mut depth, mut line, mut line_start) = (0usize, 1usize, 0usize);
    let mut in_string = false;
    let mut i = 0;
    while let Some(&b) = input.get(i) {
        if in_string {
            match b {
                // An escape: the next byte is never the closing quote.
                b'\\' => i += 1,
                b'"' => in_string = false,
                _ => {}
            }
        } else {
            match b {
                b'"' => in_string = true,
                b'[' | b'{' => {
                    depth += 1;
                    if depth > MAX_NESTING {
                        return Err(too_deep(line, i - line_start + 1));
                    }
                }
                b']' | b'}' => depth = depth.saturating_sub(1),
                _ => {}
            }
        }
        if b == b'\n' {
            line += 1;
            line_start = i + 1;
        }
        i += 1;
    }
    Ok(())
}

/// Checks an already decoded JSON value: nested at most [`MAX_NESTING`] deep.
pub fn check_value(value: &serde_json::Value) -> Result<(), CrdError> {
    use serde_json::Value;
    // Iterative: a value too deep for the limit may be too deep to recurse over.
    let mut stack = vec![(value, 1usize)];
    while let Some((value, depth)) = stack.pop() {
        if matches!(value, Value::Array(_) | Value::Object(_)) && depth > MAX_NESTING {
            return Err(CrdError::TooDeep {
                limit: MAX_NESTING,
                at: "in the object".to_string(),
            });
        }
        match value {
            Value::Array(items) => stack.extend(items.iter().map(|v| (v, depth + 1))),
            Value::Object(fields) => stack.extend(fields.values().map(|v| (v, depth + 1))),
            _ => {}
        }
    }
    Ok(())
}

/// One open block collection, as libyaml's scanner tracks it.
#[derive(Debug)]
struct Level {
    /// Its indentation column.
    column: usize,
    /// A mapping (else a sequence).
    mapping: bool,
    /// A mapping holding a sequence at its own indentation (`key:\n- item`), one
    /// more level that libyaml does not indent.
    indentless: bool,
}

/// One open flow collection.
#[derive(Debug)]
struct Flow {
    /// A sequence (else a mapping).
    sequence: bool,
    /// A single-pair mapping (`[key: value]`) is open in it, one more level.
    pair: bool,
    /// The deepest flow nesting within its current entry: a pair's mapping is
    /// known only at its `:`, but encloses the key before it.
    entry_depth: usize,
}

/// Where a possible simple key (`key: value`) starts.
#[derive(Clone, Copy, Debug)]
struct Key {
    line: usize,
    offset: usize,
    column: usize,
    /// The deepest flow nesting within the key (`[a, b]: value`): the mapping it
    /// opens is known only at its `:`, but encloses it.
    flow_depth: usize,
}

/// Follows libyaml's scanner (token starts, scalars, comments, block indentation,
/// flow levels) without producing tokens, so that it nests exactly where libyaml
/// does. Every byte is visited once. Where libyaml would stop with an error, this
/// scans on: what follows is never parsed, and counting it is merely conservative.
struct Scanner<'a> {
    text: &'a [u8],
    pos: usize,
    /// 1-based line.
    line: usize,
    /// 0-based column, in characters.
    column: usize,
    flow: usize,
    /// The open flow collections.
    flows: Vec<Flow>,
    levels: Vec<Level>,
    /// Open block collections, counting indentless sequences.
    block_depth: usize,
    key_allowed: bool,
    /// The possible simple key of the block context.
    key: Option<Key>,
    document_start: usize,
    document_line: usize,
    /// Deepest nesting allowed.
    limit: usize,
    /// Deepest nesting seen.
    max_depth: usize,
}

impl<'a> Scanner<'a> {
    fn new(text: &'a [u8], limit: usize) -> Self {
        // The reader drops a byte order mark at the start.
        let pos = if text.starts_with(b"\xEF\xBB\xBF") {
            3
        } else {
            0
        };
        Self {
            text,
            pos,
            line: 1,
            column: 0,
            flow: 0,
            flows: Vec::new(),
            levels: Vec::new(),
            block_depth: 0,
            key_allowed: true,
            key: None,
            document_start: 0,
            document_line: 1,
            limit,
            max_depth: 0,
        }
    }

    fn at(&self, offset: usize) -> u8 {
        self.text.get(self.pos + offset).copied().unwrap_or(0)
    }

    fn eof(&self) -> bool {
        self.pos >= self.text.len()
    }

    /// Length of the line break at `offset`, or 0: libyaml also breaks lines at
    /// NEL, LS and PS.
    fn break_len(&self, offset: usize) -> usize {
        match (self.at(offset), self.at(offset + 1), self.at(offset + 2)) {
            (b'\r', b'\n', _) => 2,
            (b'\r' | b'\n', _, _) => 1,
            (0xC2, 0x85, _) => 2,
            (0xE2, 0x80, 0xA8 | 0xA9) => 3,
            _ => 0,
        }
    }

    fn is_break(&self) -> bool {
        self.break_len(0) > 0
    }

    fn is_blank(&self) -> bool {
        matches!(self.at(0), b' ' | b'\t')
    }

    fn is_blankz_at(&self, offset: usize) -> bool {
        match self.text.get(self.pos + offset) {
            None | Some(b' ' | b'\t' | b'\r' | b'\n') => true,
            Some(0xC2 | 0xE2) => self.break_len(offset) > 0,
            Some(_) => false,
        }
    }

    /// Moves past bytes that are neither `stop` nor possibly a line break: the fast
    /// path through long scalars.
    fn skip_while_not(&mut self, stop: impl Fn(u8) -> bool) {
        while let Some(&b) = self.text.get(self.pos) {
            if stop(b) || matches!(b, b'\r' | b'\n' | 0xC2 | 0xE2) {
                return;
            }
            if b & 0xC0 != 0x80 {
                self.column += 1;
            }
            self.pos += 1;
        }
    }

    /// Moves to the end of the line (its break, or the end of the text).
    fn skip_line(&mut self) {
        while let Some(&b) = self.text.get(self.pos) {
            if matches!(b, b'\r' | b'\n') || (matches!(b, 0xC2 | 0xE2) && self.is_break()) {
                return;
            }
            // Columns count characters, not UTF-8 continuation bytes.
            if b & 0xC0 != 0x80 {
                self.column += 1;
            }
            self.pos += 1;
        }
    }

    fn is_breakz(&self) -> bool {
        self.eof() || self.is_break()
    }

    /// Moves past one character (a whole line break counts as one).
    fn advance(&mut self) {
        if let Some(&b) = self.text.get(self.pos)
            && b < 0x80
            && b != b'\r'
            && b != b'\n'
        {
            self.pos += 1;
            self.column += 1;
            return;
        }
        let breaks = self.break_len(0);
        if breaks > 0 {
            self.pos += breaks;
            self.line += 1;
            self.column = 0;
            return;
        }
        let width = match self.at(0) {
            0xF0..=0xFF => 4,
            0xE0..=0xEF => 3,
            0xC0..=0xDF => 2,
            _ => 1,
        };
        self.pos = (self.pos + width).min(self.text.len());
        self.column += 1;
    }

    fn indent(&self) -> Option<usize> {
        self.levels.last().map(|l| l.column)
    }

    /// Fails if the nesting is too deep, naming `column` of the current line.
    fn check_depth(&mut self, column: usize) -> Result<(), CrdError> {
        self.check_flow_depth(self.flow, column)
    }

    /// As [`Self::check_depth`], for `flow` levels of flow nesting (more than now
    /// open where a key turns out to be inside a mapping that opens after it).
    fn check_flow_depth(&mut self, flow: usize, column: usize) -> Result<(), CrdError> {
        if let Some(key) = &mut self.key {
            key.flow_depth = key.flow_depth.max(flow);
        }
        if let Some(top) = self.flows.last_mut() {
            top.entry_depth = top.entry_depth.max(flow);
        }
        self.max_depth = self.max_depth.max(self.block_depth + flow);
        if self.max_depth > self.limit {
            return Err(too_deep(self.line, column + 1));
        }
        Ok(())
    }

    fn check_document(&self) -> Result<(), CrdError> {
        if self.pos - self.document_start > MAX_DOCUMENT_BYTES {
            return Err(CrdError::TooLarge {
                what: format!("the document at line {}", self.document_line),
                limit: MAX_DOCUMENT_BYTES,
            });
        }
        Ok(())
    }

    /// Opens a block collection at `column` if it is deeper than the current one.
    fn roll(&mut self, column: usize, mapping: bool) -> Result<(), CrdError> {
        if self.flow > 0 {
            return Ok(());
        }
        match self.levels.last_mut() {
            Some(top) if top.column >= column => {
                if top.column == column && top.mapping {
                    // A `- ` at a mapping's own indentation opens an indentless
                    // sequence; the mapping's next key closes it.
                    if !mapping && !top.indentless {
                        top.indentless = true;
                        self.block_depth += 1;
                    } else if mapping && top.indentless {
                        top.indentless = false;
                        self.block_depth -= 1;
                    }
                }
            }
            _ => {
                self.levels.push(Level {
                    column,
                    mapping,
                    indentless: false,
                });
                self.block_depth += 1;
            }
        }
        self.check_depth(column)
    }

    /// Closes the block collections indented deeper than `column` (all for `None`).
    fn unroll(&mut self, column: Option<usize>) {
        if self.flow > 0 {
            return;
        }
        while let Some(top) = self.levels.last() {
            if column.is_some_and(|c| top.column <= c) {
                break;
            }
            self.block_depth -= 1 + usize::from(top.indentless);
            self.levels.pop();
        }
    }

    /// A key in a flow sequence opens a single-pair mapping.
    fn open_pair(&mut self) -> Result<(), CrdError> {
        let Some(top) = self.flows.last_mut() else {
            return Ok(());
        };
        if top.sequence && !top.pair {
            top.pair = true;
            // Counted as if the pair had been open from the entry's start.
            let key_depth = top.entry_depth + 1;
            self.flow += 1;
            self.check_flow_depth(key_depth.max(self.flow), self.column)?;
        }
        self.check_depth(self.column)
    }

    /// The end of a flow entry closes its single-pair mapping.
    fn close_pair(&mut self) {
        if let Some(top) = self.flows.last_mut()
            && top.pair
        {
            top.pair = false;
            self.flow -= 1;
        }
    }

    fn save_key(&mut self) {
        if self.flow == 0 && self.key_allowed {
            self.key = Some(Key {
                line: self.line,
                offset: self.pos,
                column: self.column,
                flow_depth: 0,
            });
        }
    }

    fn remove_key(&mut self) {
        if self.flow == 0 {
            self.key = None;
        }
    }

    fn at_document_marker(&self) -> bool {
        self.column == 0
            && (self.text[self.pos..].starts_with(b"---")
                || self.text[self.pos..].starts_with(b"..."))
            && self.is_blankz_at(3)
    }

    /// Scans to the end; returns the deepest nesting.
    fn run(mut self) -> Result<usize, CrdError> {
        loop {
            self.skip_to_token();
            if let Some(key) = self.key
                && (key.line < self.line || key.offset + SIMPLE_KEY_SPAN < self.pos)
            {
                self.key = None;
            }
            self.unroll(Some(self.column));
            // Anything but `- ` at a mapping's own indentation ends its indentless
            // sequence (it can only be the mapping's next key).
            if self.flow == 0
                && !(self.at(0) == b'-' && self.is_blankz_at(1))
                && let Some(top) = self.levels.last_mut()
                && top.column == self.column
                && top.indentless
            {
                top.indentless = false;
                self.block_depth -= 1;
            }
            if self.eof() {
                self.check_document()?;
                return Ok(self.max_depth);
            }
            if self.column == 0 && self.at(0) == b'%' {
                // A directive runs to the end of its line.
                self.unroll(None);
                self.remove_key();
                self.key_allowed = false;
                self.skip_line();
                if !self.eof() {
                    self.advance();
                }
                continue;
            }
            if self.at_document_marker() {
                self.check_document()?;
                self.document_start = self.pos;
                self.document_line = self.line;
                self.unroll(None);
                self.remove_key();
                self.key_allowed = false;
                for _ in 0..3 {
                    self.advance();
                }
                continue;
            }
            self.token()?;
            // Early, so that an oversized document is not scanned to its end.
            if self.pos - self.document_start > MAX_DOCUMENT_BYTES {
                self.check_document()?;
            }
        }
    }

    /// Skips spaces, comments and line breaks up to the next token.
    fn skip_to_token(&mut self) {
        loop {
            if self.column == 0 && self.text[self.pos..].starts_with(b"\xEF\xBB\xBF") {
                self.advance();
            }
            while self.at(0) == b' '
                || ((self.flow > 0 || !self.key_allowed) && self.at(0) == b'\t')
            {
                self.advance();
            }
            if self.at(0) == b'#' {
                self.skip_line();
            }
            if !self.is_break() {
                return;
            }
            self.advance();
            if self.flow == 0 {
                self.key_allowed = true;
            }
        }
    }

    /// Reads one token.
    fn token(&mut self) -> Result<(), CrdError> {
        let c = self.at(0);
        match c {
            b'[' | b'{' => {
                self.save_key();
                self.flow += 1;
                self.flows.push(Flow {
                    sequence: c == b'[',
                    pair: false,
                    entry_depth: self.flow,
                });
                self.check_depth(self.column)?;
                self.key_allowed = true;
                self.advance();
            }
            b']' | b'}' => {
                self.remove_key();
                self.close_pair();
                if let Some(closed) = self.flows.pop() {
                    self.flow -= 1;
                    if let Some(parent) = self.flows.last_mut() {
                        parent.entry_depth = parent.entry_depth.max(closed.entry_depth);
                    }
                }
                self.key_allowed = false;
                self.advance();
            }
            b',' => {
                self.remove_key();
                self.close_pair();
                // The parent's entry holds all of this collection.
                let flow = self.flow;
                if let [.., parent, top] = self.flows.as_mut_slice() {
                    parent.entry_depth = parent.entry_depth.max(top.entry_depth);
                }
                if let Some(top) = self.flows.last_mut() {
                    top.entry_depth = flow;
                }
                self.key_allowed = true;
                self.advance();
            }
            b'-' if self.is_blankz_at(1) => {
                self.roll(self.column, false)?;
                self.remove_key();
                self.key_allowed = true;
                self.advance();
            }
            b'?' if self.flow > 0 || self.is_blankz_at(1) => {
                self.open_pair()?;
                self.roll(self.column, true)?;
                self.remove_key();
                self.key_allowed = self.flow == 0;
                self.advance();
            }
            b':' if self.flow > 0 || self.is_blankz_at(1) => {
                // Flow context: keys open no block collection.
                if self.flow > 0 {
                    self.open_pair()?;
                    self.key_allowed = false;
                } else if let Some(key) = self.key.take() {
                    self.roll(key.column, true)?;
                    self.check_flow_depth(key.flow_depth, key.column)?;
                    self.key_allowed = false;
                } else {
                    self.roll(self.column, true)?;
                    self.key_allowed = true;
                }
                self.advance();
            }
            b'*' | b'&' => {
                self.save_key();
                self.key_allowed = false;
                self.advance();
                while self.at(0).is_ascii_alphanumeric() || matches!(self.at(0), b'_' | b'-') {
                    self.advance();
                }
            }
            b'!' => {
                self.save_key();
                self.key_allowed = false;
                self.advance();
                let verbatim = self.at(0) == b'<';
                while !self.is_blankz_at(0)
                    && (verbatim || !matches!(self.at(0), b',' | b'[' | b']' | b'{' | b'}'))
                {
                    let end = verbatim && self.at(0) == b'>';
                    self.advance();
                    if end {
                        break;
                    }
                }
            }
            b'|' | b'>' if self.flow == 0 => {
                self.remove_key();
                self.key_allowed = true;
                self.block_scalar();
            }
            b'\'' | b'"' => {
                self.save_key();
                self.key_allowed = false;
                self.quoted_scalar(c);
            }
            _ if self.starts_plain() => {
                self.save_key();
                self.key_allowed = false;
                self.plain_scalar();
            }
            // A character no token starts with: libyaml stops here.
            _ => self.advance(),
        }
        Ok(())
    }

    fn starts_plain(&self) -> bool {
        let c = self.at(0);
        let indicator = self.is_blankz_at(0)
            || matches!(
                c,
                b'-' | b'?'
                    | b':'
                    | b','
                    | b'['
                    | b']'
                    | b'{'
                    | b'}'
                    | b'#'
                    | b'&'
                    | b'*'
                    | b'!'
                    | b'|'
                    | b'>'
                    | b'\''
                    | b'"'
                    | b'%'
                    | b'@'
                    | b'`'
            );
        !indicator
            || (c == b'-' && !matches!(self.at(1), b' ' | b'\t'))
            || (self.flow == 0 && matches!(c, b'?' | b':') && !self.is_blankz_at(1))
    }

    fn plain_scalar(&mut self) {
        let indent = self.indent().map_or(0, |i| i + 1);
        let mut leading_blanks = false;
        'scalar: loop {
            if self.at_document_marker() || self.at(0) == b'#' {
                break;
            }
            while !self.is_blankz_at(0) {
                let start = self.pos;
                self.skip_while_not(|b| {
                    matches!(b, b' ' | b'\t' | b':' | b',' | b'[' | b']' | b'{' | b'}')
                });
                if self.pos > start {
                    leading_blanks = false;
                }
                if self.is_blankz_at(0) {
                    break;
                }
                let c = self.at(0);
                if self.flow > 0
                    && c == b':'
                    && matches!(self.at(1), b',' | b'?' | b'[' | b']' | b'{' | b'}')
                {
                    break 'scalar;
                }
                if (c == b':' && self.is_blankz_at(1))
                    || (self.flow > 0 && matches!(c, b',' | b'[' | b']' | b'{' | b'}'))
                {
                    break;
                }
                leading_blanks = false;
                self.advance();
            }
            if !(self.is_blank() || self.is_break()) {
                break;
            }
            while self.is_blank() || self.is_break() {
                if self.is_blank() {
                    if leading_blanks && self.column < indent && self.at(0) == b'\t' {
                        break 'scalar;
                    }
                } else {
                    leading_blanks = true;
                }
                self.advance();
            }
            if self.flow == 0 && self.column < indent {
                break;
            }
        }
        if leading_blanks {
            self.key_allowed = true;
        }
    }

    fn quoted_scalar(&mut self, quote: u8) {
        self.advance();
        while !self.eof() {
            self.skip_while_not(|b| b == quote || b == b'\\');
            if self.eof() {
                return;
            }
            let c = self.at(0);
            if quote == b'\'' && c == b'\'' && self.at(1) == b'\'' {
                self.advance();
            } else if c == quote {
                self.advance();
                return;
            } else if quote == b'"' && c == b'\\' {
                self.advance();
            }
            if !self.eof() {
                self.advance();
            }
        }
    }

    /// Skips empty lines and indentation up to `indent` (0: not known yet); returns
    /// the deepest indentation seen, or `None` where libyaml fails on a tab.
    fn block_breaks(&mut self, indent: usize) -> Option<usize> {
        let mut max_indent = 0;
        loop {
            while (indent == 0 || self.column < indent) && self.at(0) == b' ' {
                self.advance();
            }
            max_indent = max_indent.max(self.column);
            if (indent == 0 || self.column < indent) && self.at(0) == b'\t' {
                return None;
            }
            if !self.is_break() {
                return Some(max_indent);
            }
            self.advance();
        }
    }

    fn block_scalar(&mut self) {
        self.advance();
        let mut increment = 0;
        for _ in 0..2 {
            match self.at(0) {
                b'+' | b'-' => self.advance(),
                c @ b'1'..=b'9' => {
                    increment = usize::from(c - b'0');
                    self.advance();
                }
                _ => break,
            }
        }
        while self.is_blank() {
            self.advance();
        }
        if self.at(0) == b'#' {
            self.skip_line();
        }
        if !self.is_breakz() {
            return;
        }
        if !self.eof() {
            self.advance();
        }
        let parent = self.indent();
        let mut indent = match (increment, parent) {
            (0, _) => 0,
            (i, Some(p)) => p + i,
            (i, None) => i,
        };
        let Some(max_indent) = self.block_breaks(indent) else {
            return;
        };
        if indent == 0 {
            indent = max_indent.max(parent.map_or(0, |p| p + 1)).max(1);
        }
        while self.column == indent && !self.eof() {
            self.skip_line();
            if self.eof() {
                return;
            }
            self.advance();
            if self.block_breaks(indent).is_none() {
                return;
            }
        }
    }
}

/// How much of the budgets is left while aliases are expanded.
#[derive(Debug)]
struct Expansion {
    text: usize,
    document: usize,
    exceeded: bool,
}

impl Expansion {
    fn charge<E: serde::de::Error>(&mut self, cost: usize) -> Result<(), E> {
        match (self.text.checked_sub(cost), self.document.checked_sub(cost)) {
            (Some(text), Some(document)) => {
                (self.text, self.document) = (text, document);
                Ok(())
            }
            _ => {
                self.exceeded = true;
                Err(E::custom("alias expansion limit"))
            }
        }
    }
}

/// Walks a document as a deserializer yields it (aliases replayed), charging one per
/// node plus the bytes of each scalar, and stops when a budget runs out.
struct Count<'b>(&'b mut Expansion);

impl<'de> DeserializeSeed<'de> for Count<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Count<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("any YAML value")
    }

    fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<(), E> {
        self.0.charge(1)
    }

    fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<(), E> {
        self.0.charge(1)
    }

    fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<(), E> {
        self.0.charge(1)
    }

    fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<(), E> {
        self.0.charge(1)
    }

    fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<(), E> {
        self.0.charge(1 + s.len())
    }

    fn visit_bytes<E: serde::de::Error>(self, b: &[u8]) -> Result<(), E> {
        self.0.charge(1 + b.len())
    }

    fn visit_unit<E: serde::de::Error>(self) -> Result<(), E> {
        self.0.charge(1)
    }

    fn visit_none<E: serde::de::Error>(self) -> Result<(), E> {
        self.0.charge(1)
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }

    fn visit_newtype_struct<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        self.0.charge(1)?;
        while seq.next_element_seed(Count(&mut *self.0))?.is_some() {}
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        self.0.charge(1)?;
        while map.next_key_seed(Count(&mut *self.0))?.is_some() {
            map.next_value_seed(Count(&mut *self.0))?;
        }
        Ok(())
    }

    fn visit_enum<A: EnumAccess<'de>>(self, data: A) -> Result<(), A::Error> {
        // A tagged value (`!tag value`): the tag, then the value.
        self.0.charge(1)?;
        let ((), value) = data.variant_seed(Count(&mut *self.0))?;
        value.newtype_variant_seed(Count(&mut *self.0))
    }
}

/// Expands every document's aliases, as `serde_yaml_ng` does when it builds values,
/// within a budget proportional to the text's length (and per document to the
/// largest document accepted). A syntax error ends the check: parsing reports it.
fn check_alias_expansion(text: &str) -> Result<(), CrdError> {
    let mut left = Expansion {
        text: ALIAS_EXPANSION_FACTOR * text.len() + ALIAS_EXPANSION_ALLOWANCE,
        document: 0,
        exceeded: false,
    };
    for (i, document) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        left.document = ALIAS_EXPANSION_FACTOR * MAX_DOCUMENT_BYTES;
        if Count(&mut left).deserialize(document).is_err() {
            if left.exceeded {
                return Err(CrdError::AliasExpansion { document: i + 1 });
            }
            return Ok(());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests fail loudly

    use super::*;

    /// The deepest nesting the scanner sees, with no limit.
    fn depth(text: &str) -> usize {
        Scanner::new(text.as_bytes(), usize::MAX).run().unwrap()
    }

    #[test]
    fn nesting_is_counted_as_libyaml_nests() {
        assert_eq!(depth("a: b\n"), 1);
        assert_eq!(depth("a: {b: [c, d]}\n"), 3);
        // An indentless sequence is a level of its own; so is a pair in a sequence.
        assert_eq!(depth("a:\n- b: [x]\n"), 4);
        assert_eq!(depth("[a: b]"), 2);
        assert_eq!(depth("[[a]: b]"), 3);
        // A flow collection as a key sits inside the mapping its `:` opens.
        assert_eq!(depth("[a]: b\n"), 2);
        assert_eq!(depth("- - - x\n"), 3);
        assert_eq!(depth("a:\n  b:\n    c:\n      d: e\n"), 4);
        assert_eq!(depth("a: 1\n---\nb: 2\n"), 1);
    }

    #[test]
    fn brackets_in_scalars_and_comments_do_not_count() {
        let text = concat!(
            "a: \"[[[[{{\\\"[[\"\n",
            "b: '[[['' [['\n",
            "c: it's [[[ plain\n",
            "d: x\n  '[[[ continued\n",
            "# [[[[[[\n",
            "e: [x, \"]]\", '[']  # [[[\n",
            "f: |\n  [[[[ \"unbalanced\n  {{{{ 'too\n",
            "g: >-\n    [[[[\n",
            "h: [ok]\n",
        );
        assert_eq!(depth(text), 2);
    }

    #[test]
    fn every_kind_of_line_break_ends_a_comment() {
        // libyaml breaks lines at LS (and NEL): what follows is structure again.
        let text = format!("# c\u{2028}{}", "[".repeat(100));
        assert!(matches!(check_yaml(&text), Err(CrdError::TooDeep { .. })));
    }

    #[test]
    fn deep_flow_and_block_nesting_is_rejected_where_it_happens() {
        let err = check_yaml(&"[".repeat(100_000)).unwrap_err().to_string();
        assert_eq!(err, "nesting deeper than 64 levels at line 1 column 65");
        let dashes = format!("{}x\n", "- ".repeat(10_000));
        assert!(matches!(check_yaml(&dashes), Err(CrdError::TooDeep { .. })));
        let mut indented = String::from("kind: Pod\n");
        for level in 0..100 {
            indented.push_str(&format!("{}k{level}:\n", " ".repeat(level)));
        }
        let err = check_yaml(&indented).unwrap_err().to_string();
        assert_eq!(err, "nesting deeper than 64 levels at line 66 column 65");
        let ok: String = (0..MAX_NESTING)
            .map(|l| format!("{}k:\n", " ".repeat(l)))
            .collect();
        check_yaml(&ok).unwrap();
    }

    #[test]
    fn documents_and_files_are_bounded_in_size() {
        let big = format!("a: {}\n", "x".repeat(MAX_DOCUMENT_BYTES));
        let err = check_yaml(&format!("b: 1\n---\n{big}"))
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "the document at line 2 is larger than the 3.0 MiB limit"
        );
        // Many documents, each within bounds.
        let half = format!("a: {}\n", "x".repeat(MAX_DOCUMENT_BYTES / 2));
        check_yaml(&[half.as_str(); 4].join("---\n")).unwrap();
        let huge = "#".repeat(MAX_FILE_BYTES + 1);
        assert!(
            check_yaml(&huge)
                .unwrap_err()
                .to_string()
                .starts_with("the file (16.0 MiB)")
        );
    }

    #[test]
    fn aliases_may_be_reused_but_not_bombed() {
        check_yaml("a: &r {cpu: 1, memory: 1Gi}\nb: *r\nc: *r\n").unwrap();
        let mut laughs = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x]\n");
        for i in 1..10 {
            let refs = vec![format!("*a{}", i - 1); 9].join(", ");
            laughs.push_str(&format!("a{i}: &a{i} [{refs}]\n"));
        }
        assert!(matches!(
            check_yaml(&laughs),
            Err(CrdError::AliasExpansion { document: 1 })
        ));
        // Quadratic rather than exponential: serde_yaml_ng's own limit lets it pass.
        let n = 20_000;
        let wide = format!(
            "---\nok: 1\n---\na: &a [{}]\nb: [{}]\n",
            vec!["x"; n].join(","),
            vec!["*a"; n].join(",")
        );
        assert!(matches!(
            check_yaml(&wide),
            Err(CrdError::AliasExpansion { document: 2 })
        ));
    }

    #[test]
    fn json_nesting_skips_strings_and_escapes() {
        check_json(br#"{"a": "[[[[\"[[[", "b": [1, {"c": "\\"}]}"#, 1000).unwrap();
        let deep = format!("{{\"a\":\n{}", "[".repeat(1000));
        let err = check_json(deep.as_bytes(), 1 << 20)
            .unwrap_err()
            .to_string();
        assert_eq!(err, "nesting deeper than 64 levels at line 2 column 64");
        assert!(matches!(
            check_json(b"[1, 2]", 3),
            Err(CrdError::TooLarge { limit: 3, .. })
        ));
    }

    #[test]
    fn decoded_values_are_bounded_too() {
        let mut value = serde_json::json!(1);
        for _ in 0..MAX_NESTING {
            value = serde_json::json!([value]);
        }
        check_value(&value).unwrap();
        let deeper = serde_json::json!({ "a": value });
        assert!(matches!(
            check_value(&deeper),
            Err(CrdError::TooDeep { .. })
        ));
    }
}
