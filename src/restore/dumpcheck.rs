//! The restore's gatekeeper for the database dump: it reads the `pg_dumpall` text line by line, as
//! psql 15 would, and stops at the first thing `pg_dumpall --clean --if-exists` would not have
//! written.
//!
//! A restore replays the dump through `psql`, and the dump comes from the store, which an attacker
//! may have written to. SQL in it only reaches the database, but psql itself runs backslash
//! meta-commands (`\!` runs a shell, `\copy` and `\o` open files and pipes, backquotes run
//! commands) wherever it meets a backslash outside quotes and comments — mid-line, too. So before
//! psql sees a dump, `DumpChecker` lexes all of it the way psql's own lexer (psqlscan.l, with
//! `standard_conforming_strings = on`) does: quotes, `E''` escapes, `$tag$` quotes, nested
//! comments, number tokens, and psql's statement boundaries (parentheses and `BEGIN ATOMIC`
//! bodies). Outside quotes it allows only the whole-line `\restrict`, `\unrestrict`, `\connect`
//! and `\encoding SQL_ASCII` lines pg_dump writes, and `COPY … FROM stdin;` headers of pg_dump's
//! exact shape, whose data lines it then passes unread up to the `\.` line. It also refuses
//! statements that would change what it assumes about the session (`standard_conforming_strings`,
//! `client_encoding`, `SET NAMES`, `set_config`), psql variable references that could splice text
//! into the input, NUL bytes, and a dump that ends inside a quote, comment, statement or COPY.
//!
//! What it cannot see: SQL run by the server may still change the session (through strings it
//! builds at run time), and a `COPY` that fails leaves its data lines to psql's SQL lexer; the
//! defence belongs to the caller: run psql with `ON_ERROR_STOP`, and replace the dump's `\restrict`
//! keys with a fresh secret one, so that psql itself refuses meta-commands inside each section.

use std::fmt;

/// Longest excerpt of a refused line, in characters.
const EXCERPT_CHARS: usize = 80;

/// Most bytes of one statement's tokens kept for the statement-level checks; longer statements
/// only pass those checks that need no exact match.
const SIGNATURE_BYTES: usize = 512;

/// Token separator in [`DumpChecker::sig`]; NUL never reaches the lexer.
const SEP: u8 = 0;

/// The two `SET`s of these parameters pg_dump writes, as statement signatures.
const ALLOWED_SETS: [&[u8]; 2] = [
    b"set\0standard_conforming_strings\0=\0on\0",
    b"set\0client_encoding\0=\0'UTF8'\0",
];

/// The one `set_config` call pg_dump writes.
const ALLOWED_SET_CONFIG: &[u8] =
    b"select\0pg_catalog\0.\0set_config\0(\0'search_path'\0,\0''\0,\0false\0)\0";

/// What one line of the dump turned out to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Line {
    /// SQL text (or blank lines and comments).
    Sql {
        /// The line begins outside quotes and comments with no statement pending.
        starts_clean: bool,
        /// The line ends outside quotes and comments with no statement pending, so a line that
        /// both starts and ends clean holds whole statements only and may be dropped as a unit.
        ends_clean: bool,
    },
    /// An allowed psql meta-command line.
    Meta(Meta),
    /// A `COPY … FROM stdin;` header; data lines follow.
    CopyStart,
    /// A line of COPY data (passed to the server unread by psql).
    CopyData,
    /// The `\.` line that ends COPY data.
    CopyEnd,
}

/// An allowed psql meta-command, with its argument decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Meta {
    /// `\connect NAME`, `\connect "NAME"` or `\connect -reuse-previous=on "dbname='NAME'"`:
    /// the database name.
    Connect(String),
    /// `\restrict KEY`: the key.
    Restrict(String),
    /// `\unrestrict KEY`: the key.
    Unrestrict(String),
    /// `\encoding SQL_ASCII`, which pg_dump writes before connecting to a database whose name
    /// needs the `-reuse-previous` form: the encoding name.
    Encoding(String),
}

/// Why the dump was refused: the 1-based line, a short reason, and the start of the line with
/// control characters escaped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Rejection {
    /// 1-based line number.
    pub line: u64,
    /// What is wrong, in a few words.
    pub reason: String,
    /// At most 80 characters of the line (then `…`), control characters escaped.
    pub excerpt: String,
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}: {}", self.line, self.reason, self.excerpt)
    }
}

impl std::error::Error for Rejection {}

/// What a fully checked dump holds, for the caller's own checks and report.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct DumpFacts {
    /// Lines read.
    pub lines: u64,
    /// `COPY … FROM stdin` blocks.
    pub copy_blocks: u64,
    /// Databases named by `DROP DATABASE [IF EXISTS] name;`, unquoted.
    pub dropped_databases: Vec<String>,
    /// Database names given to `\connect`, in order, decoded.
    pub connects: Vec<String>,
}

/// Lexer state between bytes (psqlscan.l's start conditions, as far as they matter here).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// INITIAL: SQL text, where a backslash starts a meta-command.
    Normal,
    /// `'…'`, `B'…'`, `X'…'`, `N'…'`, `U&'…'`: only `''` is special.
    Quote,
    /// `E'…'`: a backslash escapes the next byte.
    EscQuote,
    /// `"…"` and `U&"…"`: only `""` is special.
    Ident,
    /// `$tag$…$tag$`; the tag is in [`DumpChecker::dollar_tag`].
    Dollar,
    /// `/* … */`, nesting; the depth is in [`DumpChecker::comment_depth`].
    Comment,
    /// Data lines of a `COPY … FROM stdin`, up to `\.`.
    CopyData,
}

/// Streaming checker: feed it every line of the dump with [`DumpChecker::line`], then call
/// [`DumpChecker::finish`]. After a rejection it only repeats that rejection.
#[derive(Debug)]
pub(crate) struct DumpChecker {
    state: State,
    /// Lines seen so far (the current line's number while it is checked).
    lines: u64,
    /// psql's nesting of `/* */` beyond the first.
    comment_depth: u32,
    /// The opening `$tag$` of the current dollar quote.
    dollar_tag: Vec<u8>,
    /// psql's `paren_depth`: `;` inside parentheses does not end a statement.
    paren_depth: u32,
    /// psql's `begin_depth`: `;` inside `CREATE FUNCTION … BEGIN … END` does not end it either.
    begin_depth: u32,
    /// psql's `identifier_count` and `identifiers`, which drive `begin_depth`.
    ident_count: u32,
    idents: [u8; 4],
    /// Some token other than whitespace or a comment since the last statement-ending `;`.
    pending: bool,
    /// The last token was a `;` that did not end the statement.
    after_inner_semi: bool,
    /// The statement's tokens so far, [`SEP`]-separated, words lowercased (see [`SIGNATURE_BYTES`]).
    sig: Vec<u8>,
    /// `sig` was cut short.
    sig_full: bool,
    /// The statement mentions `standard_conforming_strings` or `client_encoding`.
    mentions_guarded: bool,
    /// The statement mentions `set_config`.
    mentions_set_config: bool,
    /// Where the current quote token began on this line, if it did begin on this line.
    tok_start: Option<usize>,
    /// Line and excerpt where the open statement, quote or comment began, for [`Self::finish`].
    open_at: Option<(u64, String)>,
    /// The previous line had no trailing newline.
    ended: bool,
    copy_blocks: u64,
    dropped_databases: Vec<String>,
    connects: Vec<String>,
    /// The first rejection, repeated to later calls.
    failed: Option<Rejection>,
}

impl Default for DumpChecker {
    fn default() -> Self {
        Self::new()
    }
}

fn is_ident_start(b: u8) -> bool {
    b.is_ascii_alphabetic() || b == b'_' || b >= 0x80
}

fn is_ident_cont(b: u8) -> bool {
    is_ident_start(b) || b.is_ascii_digit() || b == b'$'
}

fn is_dolq_cont(b: u8) -> bool {
    is_ident_start(b) || b.is_ascii_digit()
}

fn is_variable_char(b: u8) -> bool {
    is_dolq_cont(b)
}

/// psql 15's SQL whitespace (`[ \t\n\r\f]`).
fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r' | 0x0c)
}

fn at(s: &[u8], i: usize) -> u8 {
    s.get(i).copied().unwrap_or(0)
}

/// End of the identifier-continuation run starting at `i`.
fn ident_run(s: &[u8], mut i: usize) -> usize {
    while i < s.len() && is_ident_cont(s[i]) {
        i += 1;
    }
    i
}

/// The first [`EXCERPT_CHARS`] characters of `line`, without its line end, control characters
/// escaped.
fn excerpt(line: &[u8]) -> String {
    let text = String::from_utf8_lossy(strip_eol(line));
    let mut out = String::new();
    for (n, c) in text.chars().enumerate() {
        if n == EXCERPT_CHARS {
            out.push('…');
            break;
        }
        match c {
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            '\n' => out.push_str("\\n"),
            c if c.is_control() => out.push_str(&format!("\\x{:02x}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

/// `line` without a trailing `\n` or `\r\n`.
fn strip_eol(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// Undoes `""` inside a double-quoted identifier's content.
fn undouble(content: &[u8], quote: u8) -> Vec<u8> {
    let mut out = Vec::with_capacity(content.len());
    let mut i = 0;
    while i < content.len() {
        out.push(content[i]);
        i += if content[i] == quote && at(content, i + 1) == quote {
            2
        } else {
            1
        };
    }
    out
}

/// Parses `"…"` (with `""` inside) filling all of `s`; returns the content, undoubled.
fn parse_dquoted(s: &[u8]) -> Option<Vec<u8>> {
    let inner = s.strip_prefix(b"\"")?.strip_suffix(b"\"")?;
    let mut i = 0;
    while i < inner.len() {
        if inner[i] == b'"' {
            if at(inner, i + 1) != b'"' {
                return None;
            }
            i += 2;
        } else {
            i += 1;
        }
    }
    Some(undouble(inner, b'"'))
}

/// The argument of a `\connect` line, decoded to the database name, if it has one of the shapes
/// pg_dump's `appendPsqlMetaConnect` writes.
fn connect_target(arg: &[u8]) -> Option<String> {
    let plain = |s: &[u8]| {
        !s.is_empty()
            && s.iter()
                .all(|&b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.')
    };
    // No control characters, and no backslash or backquote outside the conninfo form.
    let tame = |s: &[u8]| s.iter().all(|&b| b >= 0x20 && b != 0x7f);
    if plain(arg) {
        return Some(String::from_utf8_lossy(arg).into_owned());
    }
    if let Some(rest) = arg.strip_prefix(b"-reuse-previous=on ") {
        let conninfo = parse_dquoted(rest)?;
        let value = conninfo.strip_prefix(b"dbname=")?;
        if !tame(value) {
            return None;
        }
        if plain(value) {
            return Some(String::from_utf8_lossy(value).into_owned());
        }
        // appendConnStrVal: '…' with \' and \\ escaped.
        let inner = value.strip_prefix(b"'")?.strip_suffix(b"'")?;
        let mut name = Vec::with_capacity(inner.len());
        let mut i = 0;
        while i < inner.len() {
            match inner[i] {
                b'\\' if matches!(at(inner, i + 1), b'\\' | b'\'') && i + 1 < inner.len() => {
                    name.push(inner[i + 1]);
                    i += 2;
                }
                b'\\' | b'\'' => return None,
                b => {
                    name.push(b);
                    i += 1;
                }
            }
        }
        return (!name.is_empty()).then(|| String::from_utf8_lossy(&name).into_owned());
    }
    let name = parse_dquoted(arg)?;
    if name.is_empty() || !tame(&name) || name.iter().any(|&b| b == b'\\' || b == b'`') {
        return None;
    }
    Some(String::from_utf8_lossy(&name).into_owned())
}

/// Classifies a whole line (line end stripped) that starts with a backslash.
fn parse_meta(s: &[u8]) -> Option<Meta> {
    let key = |k: &[u8]| {
        (!k.is_empty() && k.iter().all(u8::is_ascii_alphanumeric))
            .then(|| String::from_utf8_lossy(k).into_owned())
    };
    if let Some(k) = s.strip_prefix(b"\\restrict ") {
        return key(k).map(Meta::Restrict);
    }
    if let Some(k) = s.strip_prefix(b"\\unrestrict ") {
        return key(k).map(Meta::Unrestrict);
    }
    if s == b"\\encoding SQL_ASCII" {
        return Some(Meta::Encoding("SQL_ASCII".into()));
    }
    if let Some(arg) = s.strip_prefix(b"\\connect ") {
        return connect_target(arg).map(Meta::Connect);
    }
    None
}

/// Checks a `COPY` header from the `COPY` keyword at `s[i..]` (line end stripped) to the end of
/// the line: `COPY name[.name[.name]] [(col, …)] FROM stdin;` then only whitespace.
fn check_copy_header(s: &[u8], i: usize) -> Result<(), &'static str> {
    const BAD: &str = "COPY other than pg_dump's \"COPY table (columns) FROM stdin;\"";
    let ws = |mut i: usize| {
        while i < s.len() && is_space(s[i]) {
            i += 1;
        }
        i
    };
    // A plain or double-quoted identifier at `i`: its end. A word glued to a quote or '&'
    // would lex differently (E'…', U&"…"), so it is refused.
    let name = |i: usize| -> Option<usize> {
        match at(s, i) {
            b'"' => {
                let mut j = i + 1;
                loop {
                    match *s.get(j)? {
                        b'"' if at(s, j + 1) == b'"' => j += 2,
                        b'"' => return Some(j + 1),
                        _ => j += 1,
                    }
                }
            }
            b if is_ident_start(b) => {
                let end = ident_run(s, i);
                (!matches!(at(s, end), b'\'' | b'&' | b'"')).then_some(end)
            }
            _ => None,
        }
    };
    // The keyword `w` at `i`, after at least one whitespace byte before it.
    let word = |i: usize, w: &[u8]| -> Option<usize> {
        let k = ws(i);
        let end = ident_run(s, k);
        (k > i && s[k..end].eq_ignore_ascii_case(w)).then_some(end)
    };
    let end = ident_run(s, i);
    if !s[i..end].eq_ignore_ascii_case(b"copy") {
        return Err(BAD);
    }
    // Table name: at least one whitespace byte, then up to three dotted parts.
    let start = ws(end);
    if start == end {
        return Err(BAD);
    }
    let mut j = name(start).ok_or(BAD)?;
    for _ in 0..2 {
        let dot = ws(j);
        if at(s, dot) != b'.' {
            break;
        }
        j = name(ws(dot + 1)).ok_or(BAD)?;
    }
    // Optional column list.
    let open = ws(j);
    if at(s, open) == b'(' {
        j = open + 1;
        loop {
            j = ws(name(ws(j)).ok_or(BAD)?);
            match at(s, j) {
                b',' => j += 1,
                b')' => {
                    j += 1;
                    break;
                }
                _ => return Err(BAD),
            }
        }
    }
    let j = word(j, b"from").ok_or(BAD)?;
    let j = word(j, b"stdin").ok_or(BAD)?;
    let semi = ws(j);
    if semi >= s.len() || s[semi] != b';' {
        return Err(BAD);
    }
    if !s[semi + 1..].iter().all(|&b| is_space(b)) {
        return Err("text after a COPY header's ';'");
    }
    Ok(())
}

impl DumpChecker {
    /// A checker at the start of a dump.
    pub fn new() -> Self {
        DumpChecker {
            state: State::Normal,
            lines: 0,
            comment_depth: 0,
            dollar_tag: Vec::new(),
            paren_depth: 0,
            begin_depth: 0,
            ident_count: 0,
            idents: [0; 4],
            pending: false,
            after_inner_semi: false,
            sig: Vec::new(),
            sig_full: false,
            mentions_guarded: false,
            mentions_set_config: false,
            tok_start: None,
            open_at: None,
            ended: false,
            copy_blocks: 0,
            dropped_databases: Vec::new(),
            connects: Vec::new(),
            failed: None,
        }
    }

    /// Checks one line including its trailing `'\n'` (the last line may lack it) and says what
    /// it is. After an error the checker is stuck: every later call returns the same error.
    pub fn line(&mut self, line: &[u8]) -> Result<Line, Rejection> {
        if let Some(r) = &self.failed {
            return Err(r.clone());
        }
        self.lines += 1;
        self.check(line).map_err(|reason| {
            let r = Rejection {
                line: self.lines,
                reason: reason.into(),
                excerpt: excerpt(line),
            };
            self.failed = Some(r.clone());
            r
        })
    }

    /// Ends the dump: it must not stop inside a quote, comment, statement or COPY data.
    pub fn finish(self) -> Result<DumpFacts, Rejection> {
        if let Some(r) = self.failed {
            return Err(r);
        }
        let reason = match self.state {
            State::Normal if self.pending => {
                Some("statement without its ';' at the end of the dump")
            }
            State::Normal => None,
            State::Quote | State::EscQuote => Some("string not closed at the end of the dump"),
            State::Ident => Some("quoted identifier not closed at the end of the dump"),
            State::Dollar => Some("dollar quote not closed at the end of the dump"),
            State::Comment => Some("comment not closed at the end of the dump"),
            State::CopyData => Some("COPY data without its \\. line at the end of the dump"),
        };
        if let Some(reason) = reason {
            let (line, excerpt) = self.open_at.unwrap_or((self.lines, String::new()));
            return Err(Rejection {
                line,
                reason: reason.into(),
                excerpt,
            });
        }
        Ok(DumpFacts {
            lines: self.lines,
            copy_blocks: self.copy_blocks,
            dropped_databases: self.dropped_databases,
            connects: self.connects,
        })
    }

    /// Whether the lexer is between statements, outside quotes and comments.
    fn clean(&self) -> bool {
        self.state == State::Normal && !self.pending
    }

    fn check(&mut self, line: &[u8]) -> Result<Line, &'static str> {
        if self.ended {
            return Err("line after a last line without a newline");
        }
        let body = match line.strip_suffix(b"\n") {
            Some(body) => body,
            None => {
                self.ended = true;
                line
            }
        };
        if line.contains(&0) {
            return Err("NUL byte");
        }
        if self.state == State::CopyData {
            // Fast path: psql passes data lines on unread until the exact line "\.".
            if body == b"\\." || body == b"\\.\r" {
                self.state = State::Normal;
                self.open_at = None;
                return Ok(Line::CopyEnd);
            }
            return Ok(Line::CopyData);
        }
        let starts_clean = self.clean();
        let kind = self.lex(body, starts_clean)?;
        if kind == Line::CopyStart {
            self.open_at = Some((self.lines, excerpt(line)));
            return Ok(kind);
        }
        let ends_clean = self.clean();
        if ends_clean {
            self.open_at = None;
        } else if self.open_at.is_none() {
            self.open_at = Some((self.lines, excerpt(line)));
        }
        Ok(match kind {
            Line::Sql { .. } => Line::Sql {
                starts_clean,
                ends_clean,
            },
            other => other,
        })
    }

    /// Adds a token to the statement signature.
    fn sig_push(&mut self, tok: &[u8]) {
        if self.sig.len() + tok.len() + 1 > SIGNATURE_BYTES {
            self.sig_full = true;
            return;
        }
        self.sig.extend_from_slice(tok);
        self.sig.push(SEP);
    }

    fn sig_push_lower(&mut self, tok: &[u8]) {
        if self.sig.len() + tok.len() + 1 > SIGNATURE_BYTES {
            self.sig_full = true;
            return;
        }
        self.sig.extend(tok.iter().map(u8::to_ascii_lowercase));
        self.sig.push(SEP);
    }

    /// Bookkeeping for a token that is not whitespace or a comment.
    fn token(&mut self) {
        self.pending = true;
        self.after_inner_semi = false;
    }

    /// A closed quote token `s[start..end]` (or one begun on an earlier line).
    fn quote_closed(&mut self, s: &[u8], end: usize, ident: bool) {
        match self.tok_start.take() {
            Some(start) => {
                let tok = &s[start..end];
                if let Some(name) = ident.then(|| parse_dquoted(tok)).flatten() {
                    self.check_name(&name);
                }
                self.sig_push(tok);
            }
            None => self.sig_push(if ident { b"\"?" } else { b"'?" }),
        }
    }

    /// Notes identifiers the statement-level checks care about.
    fn check_name(&mut self, name: &[u8]) {
        if name.eq_ignore_ascii_case(b"standard_conforming_strings")
            || name.eq_ignore_ascii_case(b"client_encoding")
        {
            self.mentions_guarded = true;
        } else if name.eq_ignore_ascii_case(b"set_config") {
            self.mentions_set_config = true;
        }
    }

    /// An identifier token (psql's `{identifier}` rule), with psql's `BEGIN … END` tracking.
    fn identifier(&mut self, word: &[u8]) {
        if self.ident_count == 0 {
            self.idents = [0; 4];
        }
        const TRACKED: [&[u8]; 5] = [b"create", b"function", b"procedure", b"or", b"replace"];
        if TRACKED.iter().any(|w| word.eq_ignore_ascii_case(w)) && (self.ident_count as usize) < 4 {
            self.idents[self.ident_count as usize] = word[0].to_ascii_lowercase();
        }
        self.ident_count = self.ident_count.saturating_add(1);
        let id = &self.idents;
        if id[0] == b'c'
            && (id[1] == b'f'
                || id[1] == b'p'
                || (id[1] == b'o' && id[2] == b'r' && (id[3] == b'f' || id[3] == b'p')))
            && self.paren_depth == 0
        {
            if word.eq_ignore_ascii_case(b"begin") {
                self.begin_depth += 1;
            } else if word.eq_ignore_ascii_case(b"case") {
                if self.begin_depth >= 1 {
                    self.begin_depth += 1;
                }
            } else if word.eq_ignore_ascii_case(b"end") && self.begin_depth > 0 {
                self.begin_depth -= 1;
            }
        }
        self.check_name(word);
        self.sig_push_lower(word);
    }

    /// A `;` psql ends the statement at: run the statement-level checks and reset.
    fn statement_end(&mut self) -> Result<(), &'static str> {
        let mut words: [&[u8]; 5] = [b""; 5];
        for (slot, tok) in words.iter_mut().zip(self.sig.split(|&b| b == SEP)) {
            *slot = tok;
        }
        let word = |n: usize| words[n];
        if self.mentions_guarded && (self.sig_full || !ALLOWED_SETS.contains(&self.sig.as_slice()))
        {
            return Err(
                "statement touching standard_conforming_strings or client_encoding \
                        other than pg_dump's SET",
            );
        }
        if self.mentions_set_config && (self.sig_full || self.sig != ALLOWED_SET_CONFIG) {
            return Err("set_config call other than pg_dump's search_path one");
        }
        if word(0) == b"set"
            && (word(1) == b"names"
                || (matches!(word(1), b"session" | b"local") && word(2) == b"names"))
        {
            return Err("SET NAMES changes the client encoding");
        }
        if word(0) == b"drop" && word(1) == b"database" {
            let n = if word(2) == b"if" && word(3) == b"exists" {
                4
            } else {
                2
            };
            let name = word(n);
            let decoded = match parse_dquoted(name) {
                Some(n) => Some(n),
                None if !name.is_empty() && name.iter().all(|&b| is_ident_cont(b)) => {
                    Some(name.to_vec())
                }
                None => None,
            };
            if let Some(d) = decoded {
                self.dropped_databases
                    .push(String::from_utf8_lossy(&d).into_owned());
            }
        }
        self.sig.clear();
        self.sig_full = false;
        self.mentions_guarded = false;
        self.mentions_set_config = false;
        self.pending = false;
        self.ident_count = 0;
        Ok(())
    }

    /// Lexes one line (without its `\n`) from the current state.
    fn lex(&mut self, s: &[u8], starts_clean: bool) -> Result<Line, &'static str> {
        let n = s.len();
        let mut i = 0;
        self.tok_start = None;
        while i < n {
            match self.state {
                State::Quote => match s[i..].iter().position(|&b| b == b'\'') {
                    None => i = n,
                    Some(p) => {
                        let q = i + p;
                        if at(s, q + 1) == b'\'' {
                            i = q + 2;
                        } else {
                            i = q + 1;
                            self.state = State::Normal;
                            self.quote_closed(s, i, false);
                        }
                    }
                },
                State::EscQuote => match s[i..].iter().position(|&b| b == b'\'' || b == b'\\') {
                    None => i = n,
                    Some(p) => {
                        let q = i + p;
                        if s[q] == b'\\' {
                            // Escapes the next byte on this line; at the line end it is alone.
                            i = (q + 2).min(n);
                        } else if at(s, q + 1) == b'\'' {
                            i = q + 2;
                        } else {
                            i = q + 1;
                            self.state = State::Normal;
                            self.quote_closed(s, i, false);
                        }
                    }
                },
                State::Ident => match s[i..].iter().position(|&b| b == b'"') {
                    None => i = n,
                    Some(p) => {
                        let q = i + p;
                        if at(s, q + 1) == b'"' {
                            i = q + 2;
                        } else {
                            i = q + 1;
                            self.state = State::Normal;
                            self.quote_closed(s, i, true);
                        }
                    }
                },
                State::Dollar => {
                    let tag = &self.dollar_tag;
                    let mut found = None;
                    let mut j = i;
                    while let Some(p) = s[j..].iter().position(|&b| b == b'$') {
                        let q = j + p;
                        if s[q..].starts_with(tag) {
                            found = Some(q + tag.len());
                            break;
                        }
                        j = q + 1;
                    }
                    match found {
                        None => i = n,
                        Some(end) => {
                            i = end;
                            self.state = State::Normal;
                            self.quote_closed(s, i, false);
                        }
                    }
                }
                State::Comment => {
                    if s[i] == b'/' && at(s, i + 1) == b'*' {
                        self.comment_depth += 1;
                        i += 2;
                    } else if s[i] == b'*' && at(s, i + 1) == b'/' {
                        if self.comment_depth == 0 {
                            self.state = State::Normal;
                        } else {
                            self.comment_depth -= 1;
                        }
                        i += 2;
                    } else {
                        i += 1;
                    }
                }
                State::CopyData => unreachable!("COPY data lines are not lexed"),
                State::Normal => {
                    if let Some(kind) = self.normal(s, &mut i, starts_clean)? {
                        return Ok(kind);
                    }
                }
            }
        }
        Ok(Line::Sql {
            starts_clean,
            ends_clean: false,
        })
    }

    /// One token in the normal state at `s[*i]`; `Some` when the line is settled as a whole
    /// (a meta-command or a COPY header).
    fn normal(
        &mut self,
        s: &[u8],
        i: &mut usize,
        starts_clean: bool,
    ) -> Result<Option<Line>, &'static str> {
        let n = s.len();
        let c = s[*i];
        let next = at(s, *i + 1);
        match c {
            b' ' | b'\t' | b'\r' | 0x0c => *i += 1,
            b'-' if next == b'-' => {
                // psql's comment stops at a carriage return, too.
                *i = s[*i..]
                    .iter()
                    .position(|&b| b == b'\r')
                    .map_or(n, |p| *i + p);
            }
            b'/' if next == b'*' => {
                self.state = State::Comment;
                self.comment_depth = 0;
                *i += 2;
            }
            b'\\' => {
                if *i == 0 && starts_clean {
                    if let Some(meta) = parse_meta(strip_eol(s)) {
                        if let Meta::Connect(name) = &meta {
                            self.connects.push(name.clone());
                        }
                        *i = n;
                        return Ok(Some(Line::Meta(meta)));
                    }
                    return Err("psql meta-command pg_dump does not write");
                }
                if *i == 0 || self.pending {
                    return Err("psql meta-command inside a statement");
                }
                return Err("psql meta-command after other text on the line");
            }
            b'\'' => {
                self.token();
                self.tok_start = Some(*i);
                self.state = State::Quote;
                *i += 1;
            }
            b'"' => {
                self.token();
                self.tok_start = Some(*i);
                self.state = State::Ident;
                *i += 1;
            }
            b'$' => {
                self.token();
                if next.is_ascii_digit() {
                    // Parameter, possibly with trailing junk.
                    let mut j = *i + 1;
                    while at(s, j).is_ascii_digit() {
                        j += 1;
                    }
                    if is_ident_start(at(s, j)) {
                        j = ident_run(s, j);
                    }
                    self.sig_push(&s[*i..j]);
                    *i = j;
                } else {
                    let mut j = *i + 1;
                    if is_ident_start(next) {
                        while j < n && is_dolq_cont(s[j]) {
                            j += 1;
                        }
                    }
                    if at(s, j) == b'$' {
                        self.dollar_tag.clear();
                        self.dollar_tag.extend_from_slice(&s[*i..=j]);
                        self.tok_start = Some(*i);
                        self.state = State::Dollar;
                        *i = j + 1;
                    } else {
                        self.sig_push(b"$");
                        *i += 1;
                    }
                }
            }
            b';' => {
                *i += 1;
                if self.paren_depth == 0 && self.begin_depth == 0 {
                    self.statement_end()?;
                    self.after_inner_semi = false;
                } else {
                    self.token();
                    self.sig_push(b";");
                    self.after_inner_semi = true;
                }
            }
            b'(' | b')' => {
                self.token();
                if c == b'(' {
                    self.paren_depth += 1;
                } else if self.paren_depth > 0 {
                    self.paren_depth -= 1;
                }
                self.sig_push(&s[*i..*i + 1]);
                *i += 1;
            }
            b':' => {
                self.token();
                if next == b':' || next == b'=' {
                    self.sig_push(&s[*i..*i + 2]);
                    *i += 2;
                } else if is_variable_char(next) {
                    // psql substitutes a defined variable's value here and lexes it as input;
                    // its own variables are all upper case, and nothing in a checked dump can
                    // define another.
                    let mut j = *i + 1;
                    while j < n && is_variable_char(s[j]) {
                        j += 1;
                    }
                    if s[*i + 1..j].iter().any(u8::is_ascii_uppercase) {
                        return Err("psql variable reference");
                    }
                    self.sig_push(&s[*i..j]);
                    *i = j;
                } else {
                    // :'name', :"name" and :{?name} are substituted quoted, as one token.
                    self.sig_push(b":");
                    *i += 1;
                }
            }
            b'0'..=b'9' => self.number(s, i),
            b'.' if next.is_ascii_digit() => self.number(s, i),
            b if is_ident_start(b) => return self.word(s, i, starts_clean),
            _ => {
                self.token();
                self.sig_push(&s[*i..*i + 1]);
                *i += 1;
            }
        }
        Ok(None)
    }

    /// A number token (psql 15: integer, decimal, real, and their "junk" and "fail" forms).
    fn number(&mut self, s: &[u8], i: &mut usize) {
        self.token();
        let start = *i;
        let mut j = start;
        while at(s, j).is_ascii_digit() {
            j += 1;
        }
        let int_digits = j > start;
        let mut done = false;
        if at(s, j) == b'.' {
            if int_digits && at(s, j + 1) == b'.' {
                done = true; // "1..": the integer, then "..".
            } else {
                j += 1;
                while at(s, j).is_ascii_digit() {
                    j += 1;
                }
            }
        }
        if !done {
            if matches!(at(s, j), b'e' | b'E') && matches!(at(s, j + 1), b'+' | b'-') {
                if at(s, j + 2).is_ascii_digit() {
                    j += 2;
                    while at(s, j).is_ascii_digit() {
                        j += 1;
                    }
                    if is_ident_start(at(s, j)) {
                        j = ident_run(s, j);
                    }
                } else {
                    j += 2; // "1e+": one (bad) token.
                }
            } else if is_ident_start(at(s, j)) {
                // "1e5", "1abc", "1.e": the number with the identifier run after it.
                j = ident_run(s, j);
            }
        }
        self.sig_push(&s[start..j]);
        *i = j;
    }

    /// A token starting with a letter: a string prefix or an identifier.
    fn word(
        &mut self,
        s: &[u8],
        i: &mut usize,
        starts_clean: bool,
    ) -> Result<Option<Line>, &'static str> {
        let c = s[*i];
        let next = at(s, *i + 1);
        let was_pending = self.pending;
        let after_inner_semi = self.after_inner_semi;
        self.token();
        match (c.to_ascii_lowercase(), next) {
            (b'e', b'\'') => {
                self.tok_start = Some(*i);
                self.state = State::EscQuote;
                *i += 2;
                return Ok(None);
            }
            (b'b' | b'x', b'\'') => {
                self.tok_start = Some(*i);
                self.state = State::Quote;
                *i += 2;
                return Ok(None);
            }
            (b'n', b'\'') => {
                // psql takes the 'n' alone, then the string.
                *i += 1;
                return Ok(None);
            }
            (b'u', b'&') => {
                match at(s, *i + 2) {
                    b'\'' => {
                        self.tok_start = Some(*i);
                        self.state = State::Quote;
                        *i += 3;
                    }
                    b'"' => return Err("Unicode-escaped identifier (U&\"…\")"),
                    _ => {
                        self.sig_push(b"u");
                        *i += 1;
                    }
                }
                return Ok(None);
            }
            _ => {}
        }
        let end = ident_run(s, *i);
        let w = &s[*i..end];
        if w.eq_ignore_ascii_case(b"copy") {
            if after_inner_semi {
                return Err("COPY inside a statement psql sends as one");
            }
            if !was_pending {
                if !(starts_clean && s[..*i].iter().all(|&b| is_space(b))) {
                    return Err("COPY statement not at the start of its line");
                }
                check_copy_header(s, *i)?;
                self.state = State::CopyData;
                self.pending = false;
                self.ident_count = 0;
                self.sig.clear();
                self.sig_full = false;
                self.copy_blocks += 1;
                *i = s.len();
                return Ok(Some(Line::CopyStart));
            }
        }
        self.identifier(w);
        *i = end;
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `text` split after each '\n' and returns the facts or the first rejection.
    fn run(text: &[u8]) -> Result<DumpFacts, Rejection> {
        let mut c = DumpChecker::new();
        for line in text.split_inclusive(|&b| b == b'\n') {
            c.line(line)?;
        }
        c.finish()
    }

    fn lines(text: &str) -> Vec<Line> {
        let mut c = DumpChecker::new();
        let out = text
            .split_inclusive('\n')
            .map(|l| c.line(l.as_bytes()).unwrap())
            .collect();
        c.finish().unwrap();
        out
    }

    /// Asserts `text` is refused at `line`, and returns the reason.
    fn refused(text: &str, line: u64) -> String {
        match run(text.as_bytes()) {
            Ok(_) => panic!("accepted: {text:?}"),
            Err(r) => {
                assert_eq!(r.line, line, "{text:?}: {r}");
                r.reason
            }
        }
    }

    fn accepted(text: &str) -> DumpFacts {
        run(text.as_bytes()).unwrap_or_else(|r| panic!("{text:?}: {r}"))
    }

    const KEY: &str = "nOJlSW5BE8LwGLLQOfgNQ3Q88Sqlm7crMkYAYohsAZXXyJO8X5YWxTIJ1cikQRa";

    /// An excerpt of a real `pg_dumpall --clean --if-exists` (PostgreSQL 15.18) of a cluster with
    /// an Immich-like database.
    fn real_dump() -> String {
        r#"--
-- PostgreSQL database cluster dump
--

\restrict KEY

SET default_transaction_read_only = off;

SET client_encoding = 'UTF8';
SET standard_conforming_strings = on;

--
-- Drop databases (except postgres and template1)
--

DROP DATABASE IF EXISTS immich;
DROP DATABASE IF EXISTS "My DB";




--
-- Drop roles
--

DROP ROLE IF EXISTS postgres;


--
-- Roles
--

CREATE ROLE postgres;
ALTER ROLE postgres WITH SUPERUSER INHERIT CREATEROLE CREATEDB LOGIN REPLICATION BYPASSRLS;

\unrestrict KEY

--
-- Databases
--

--
-- Database "template1" dump
--

\restrict KEY

-- Dumped from database version 15.18 (Debian 15.18-0+deb12u1)
-- Dumped by pg_dump version 15.18 (Debian 15.18-0+deb12u1)

SET statement_timeout = 0;
SET lock_timeout = 0;
SET idle_in_transaction_session_timeout = 0;
SET client_encoding = 'UTF8';
SET standard_conforming_strings = on;
SELECT pg_catalog.set_config('search_path', '', false);
SET check_function_bodies = false;
SET xmloption = content;
SET client_min_messages = warning;
SET row_security = off;

UPDATE pg_catalog.pg_database SET datistemplate = false WHERE datname = 'template1';
DROP DATABASE template1;
--
-- Name: template1; Type: DATABASE; Schema: -; Owner: postgres
--

CREATE DATABASE template1 WITH TEMPLATE = template0 ENCODING = 'UTF8' LOCALE_PROVIDER = libc LOCALE = 'C.UTF-8';


ALTER DATABASE template1 OWNER TO postgres;

\unrestrict KEY
\connect template1
\restrict KEY

COMMENT ON DATABASE template1 IS 'default template for new databases';

\unrestrict KEY
\encoding SQL_ASCII
\connect -reuse-previous=on "dbname='My DB'"
\restrict KEY

SET client_encoding = 'UTF8';
\unrestrict KEY
\connect "Upper"
\restrict KEY
\unrestrict KEY
\connect immich
\restrict KEY

CREATE EXTENSION IF NOT EXISTS "uuid-ossp" WITH SCHEMA public;

--
-- Name: f(); Type: FUNCTION; Schema: public; Owner: postgres
--

CREATE FUNCTION public.f() RETURNS text
    LANGUAGE sql
    AS $$ select 'a\b' $$;

CREATE FUNCTION public.updated_at() RETURNS trigger
    LANGUAGE plpgsql
    AS $_$
BEGIN
  new."updatedAt" = now(); -- \! not a command here
  RETURN new;
END;
$_$;

CREATE FUNCTION public.sqlbody(a integer) RETURNS integer
    LANGUAGE sql
    BEGIN ATOMIC
 SELECT (a + 1);
 SELECT (a * 2);
END;

CREATE VIEW public.v AS
 SELECT (ARRAY[1, 2, 3])[1:2] AS s,
    1 AS i,
    'x\y'::text AS e;

CREATE TABLE public."user" (
    id uuid DEFAULT public.uuid_generate_v4() NOT NULL,
    "Name" text,
    note text DEFAULT 'it''s \N'::text
);

COPY public.t (a, b) FROM stdin;
x\\y	1
\N	2
\.

COPY public."Weird" (id, "Name", note) FROM stdin;
1	a\\b	tab\there\nnewline
2	\N	\\! id
3	q'x	\\.
4	\\.	x
\.

COMMENT ON TABLE public."user" IS 'backslash \ and /* not a comment';

\unrestrict KEY

--
-- PostgreSQL database cluster dump complete
--

"#
        .replace("KEY", KEY)
    }

    #[test]
    fn real_dump_passes_with_its_facts() {
        let facts = accepted(&real_dump());
        assert_eq!(facts.copy_blocks, 2);
        assert_eq!(facts.dropped_databases, ["immich", "My DB", "template1"]);
        assert_eq!(facts.connects, ["template1", "My DB", "Upper", "immich"]);
        assert_eq!(facts.lines, real_dump().lines().count() as u64);
    }

    #[test]
    fn line_kinds() {
        let got = lines(&format!(
            "\\restrict {KEY}\nDROP ROLE IF EXISTS postgres;\nCREATE TABLE t (\n a int\n);\n\
             COPY public.t (a) FROM stdin;\n1\n\\.\n\\unrestrict {KEY}\n\\connect immich\n"
        ));
        use Line::*;
        assert_eq!(
            got,
            [
                Meta(super::Meta::Restrict(KEY.into())),
                Sql {
                    starts_clean: true,
                    ends_clean: true
                },
                Sql {
                    starts_clean: true,
                    ends_clean: false
                },
                Sql {
                    starts_clean: false,
                    ends_clean: false
                },
                Sql {
                    starts_clean: false,
                    ends_clean: true
                },
                CopyStart,
                CopyData,
                CopyEnd,
                Meta(super::Meta::Unrestrict(KEY.into())),
                Meta(super::Meta::Connect("immich".into())),
            ]
        );
    }

    #[test]
    fn allowed_meta_commands() {
        let cases = [
            ("\\connect immich\n", "immich"),
            ("\\connect my_db.x2\n", "my_db.x2"),
            ("\\connect \"Upper\"\n", "Upper"),
            ("\\connect \"My \"\"DB\"\"\"\n", "My \"DB\""),
            ("\\connect -reuse-previous=on \"dbname='My DB'\"\n", "My DB"),
            (
                "\\connect -reuse-previous=on \"dbname='it\\'s \\\\ \"\"x\"\"'\"\n",
                "it's \\ \"x\"",
            ),
            ("\\connect -reuse-previous=on \"dbname=plain\"\r\n", "plain"),
        ];
        for (text, name) in cases {
            let got = lines(text);
            assert_eq!(got, [Line::Meta(Meta::Connect(name.into()))], "{text:?}");
        }
        assert_eq!(
            lines("\\restrict abc123\n"),
            [Line::Meta(Meta::Restrict("abc123".into()))]
        );
        assert_eq!(
            lines("\\unrestrict Z9\r\n"),
            [Line::Meta(Meta::Unrestrict("Z9".into()))]
        );
        assert_eq!(
            lines("\\encoding SQL_ASCII"),
            [Line::Meta(Meta::Encoding("SQL_ASCII".into()))]
        );
    }

    #[test]
    fn refused_meta_commands() {
        for text in [
            "\\! id\n",
            "\\copy t from '/etc/passwd'\n",
            "\\o | sh\n",
            "\\set x 1\n",
            "\\gexec\n",
            "\\i /etc/passwd\n",
            "\\\\\n",
            "\\.\n",
            "\\connect `id`\n",
            "\\connect :DB\n",
            "\\connect immich extra\n",
            "\\connect immich \\! id\n",
            "\\connect -reuse-previous=on \"dbname=x host=evil\"\n",
            "\\connect -reuse-previous=on \"dbname='x' \\! id\"\n",
            "\\connect \"a`id`\"\n",
            "\\connect\n",
            "\\restrict\n",
            "\\restrict a b\n",
            "\\restrict `id`\n",
            "\\encoding SJIS\n",
            " \\connect immich\n",
            "\\connectimmich\n",
        ] {
            refused(&format!("SELECT 1;\n{text}"), 2);
        }
        assert!(refused("SELECT 1; \\! id\n", 1).contains("after other text"));
        assert!(refused("SELECT 1\n\\connect x\n;\n", 2).contains("inside a statement"));
        refused("SELECT 1 \\g\n", 1);
        refused("SELECT 1\\;\n", 1);
        refused("SELECT 'a' \\! id\n", 1);
        refused("/* c */ \\! id\n", 1);
        refused("SELECT $$x$$\\! id\n", 1);
        refused("SELECT :USER;\n", 1);
        refused("SELECT :LAST_ERROR_MESSAGE;\n", 1);
        refused("SELECT 1;\n\n\nSELECT 'x';\\connect x\n", 4);
    }

    #[test]
    fn standard_strings_keep_backslashes_literal() {
        refused("SELECT 'a\\'; \\! id\n", 1);
        refused("SELECT 'a\\';\n\\! id\n", 2);
        accepted("SELECT 'a\\'';\\! id';\n");
        accepted("SELECT B'1\\', X'\\', N'\\', U&'\\';\n");
        refused("SELECT U&'\\'\\! id\n", 1);
    }

    #[test]
    fn escape_strings() {
        accepted("SELECT E'a\\'; \\! id';\n");
        accepted("SELECT e'a\\\\', 'b';\n");
        refused("SELECT e'a\\\\'; \\! id\n", 1);
        accepted("SELECT E'it''s \\! id';\n");
        // A backslash at the end of a line escapes nothing on the next.
        refused("SELECT E'abc\\\n'; \\! id\n", 2);
        // A letter glued to a number or word is not a string prefix.
        refused("SELECT 1e'\\'; \\! id\n", 1);
        refused("SELECT 1.e'\\'; \\! id\n", 1);
        refused("SELECT 1ee'\\'; \\! id\n", 1);
        refused("SELECT $1e'\\'; \\! id\n", 1);
        refused("SELECT abe'\\'; \\! id\n", 1);
        accepted("SELECT 1+e'\\'; \\! id';\n");
        accepted("SELECT 1e+e'\\'; \\! id';\n");
        accepted("SELECT a.e'\\'; \\! id';\n");
    }

    #[test]
    fn dollar_quotes() {
        accepted("SELECT $$ \\! id $$;\n");
        accepted("CREATE FUNCTION f() RETURNS int AS $body$\n\\! id\n$x$ $ $$ \\copy\n$body$ LANGUAGE sql;\n");
        accepted("SELECT $a$ $a $b$ \\! $a$;\n");
    }

    #[test]
    fn dollar_edge_cases() {
        accepted("PREPARE p AS SELECT $1$$ \\! id $$;\n");
        refused("SELECT a$$ \\! id $$;\n", 1);
        refused("SELECT $x \\! id $;\n", 1);
        accepted("SELECT 1$$ \\! id $$;\n");
    }

    #[test]
    fn comments() {
        accepted("/* \\! id */ SELECT 1;\n");
        accepted("/* a /* nested \\! */ still \\! comment */ SELECT 1;\n");
        accepted("/* a /* b */\n \\! id\n */ SELECT 1;\n");
        refused("/* a /* b */ */ \\! id\n", 1);
        accepted("-- \\! id\nSELECT 1; -- \\! id\n");
        accepted("SELECT 1 --\\! id\n;\n");
        // psql ends a -- comment at a carriage return.
        refused("-- x\r\\! id\n", 1);
        accepted("SELECT 1; -- x\r\n");
        refused("SELECT 1 +--x\n\\! id\n;\n", 2);
        accepted("SELECT 1 +/* \\! */ 2;\n");
        refused("SELECT 1e--x \\! id\n", 1);
    }

    #[test]
    fn copy_blocks() {
        let f = accepted(
            "COPY public.t (a, \"B c\") FROM stdin;\n\\! id\n\\\\.\n \\.\n\\.x\n'\n$$\n\\.\nSELECT 1;\n",
        );
        assert_eq!(f.copy_blocks, 1);
        accepted("copy  \"S\" . \"T\"  FROM  STDIN ;  \r\n\\.\r\n");
        accepted("COPY public.t FROM stdin;\n\\.");
        for text in [
            "COPY public.t TO stdout;\n",
            "COPY public.t FROM stdout;\n",
            "COPY public.t FROM '/etc/passwd';\n",
            "COPY public.t FROM PROGRAM 'id';\n",
            "COPY public.t (a) FROM stdin WITH (FORMAT csv);\n",
            "COPY (SELECT 1) TO stdout;\n",
            "COPY public.t FROM stdin; SELECT 1;\n",
            "COPY public.t FROM stdin; \\! id\n",
            "COPY public.t FROM stdin\n",
            "SELECT 1; COPY public.t FROM stdin;\n",
            "COPY e'x' FROM stdin;\n",
            "COPY public.t (a,) FROM stdin;\n",
        ] {
            refused(&format!("SELECT 1;\n{text}\\.\n"), 2);
        }
        refused("COPY t\nFROM stdin;\n\\.\n", 1);
        refused(
            "CREATE FUNCTION begin() RETURNS int LANGUAGE sql RETURN 1; COPY t FROM stdin; END;\n",
            1,
        );
        refused("SELECT (1; COPY t FROM stdin;\n", 1);
        // Failing COPY is the caller's business: here it is just data.
        accepted("COPY missing.t FROM stdin;\n\\! id\n\\.\n");
    }

    #[test]
    fn statement_boundaries_follow_psql() {
        // psql keeps collecting inside parentheses and BEGIN ATOMIC bodies.
        refused("SELECT (1;\n\\connect x\n", 2);
        refused(
            "CREATE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT 1;\n\\connect x\n",
            2,
        );
        accepted("CREATE OR REPLACE PROCEDURE p() LANGUAGE sql BEGIN ATOMIC SELECT CASE WHEN true THEN 1 END; END;\n\\connect x\n");
        refused(
            "CREATE FUNCTION begin() RETURNS int LANGUAGE sql RETURN 1;\n\\connect x\n",
            2,
        );
    }

    #[test]
    fn session_settings_are_pinned() {
        accepted("SET standard_conforming_strings = on;\nSET client_encoding = 'UTF8';\n");
        refused("SELECT 1;\nSET standard_conforming_strings = off;\n", 2);
        refused("SET client_encoding = 'SJIS';\n", 1);
        refused("SET \"client_encoding\" = 'SJIS';\n", 1);
        refused("SET CLIENT_ENCODING TO 'UTF8';\n", 1);
        refused(
            "ALTER DATABASE x SET standard_conforming_strings\n = off;\n",
            2,
        );
        refused("SET NAMES 'SJIS';\n", 1);
        refused("SET SESSION NAMES 'SJIS';\n", 1);
        refused("SELECT set_config('client_encoding', 'SJIS', false);\n", 1);
        refused("SET U&\"client_encodin\\0067\" = 'SJIS';\n", 1);
        accepted("SELECT 'client_encoding';\n");
    }

    #[test]
    fn unterminated_at_end() {
        assert!(refused("SELECT 1;\nSELECT 'abc\n\n", 2).contains("string"));
        assert!(refused("SELECT E'abc\\'\n", 1).contains("string"));
        assert!(refused("SELECT \"abc\n", 1).contains("identifier"));
        assert!(refused("SELECT $x$ abc\n", 1).contains("dollar"));
        assert!(refused("/* a /* b */\n", 1).contains("comment"));
        assert!(refused("SELECT 1;\nCOPY t FROM stdin;\n1\n", 2).contains("COPY"));
        assert!(refused("SELECT 1;\nCREATE TABLE t (\n a int\n)\n", 2).contains("';'"));
        accepted("SELECT 1; /* c */ -- d\n");
        accepted("");
    }

    #[test]
    fn nul_and_line_shape() {
        refused("SELECT 1;\nSELECT '\0';\n", 2);
        refused("COPY t FROM stdin;\na\0b\n\\.\n", 2);
        let mut c = DumpChecker::new();
        c.line(b"SELECT 1;").unwrap();
        assert_eq!(c.line(b"SELECT 2;\n").unwrap_err().line, 2);
    }

    #[test]
    fn crlf_lines() {
        let f = accepted(&format!(
            "\\restrict {KEY}\r\nSELECT 1;\r\nCOPY t (a) FROM stdin;\r\nx\r\n\\.\r\n\\connect immich\r\n"
        ));
        assert_eq!((f.copy_blocks, f.connects.len()), (1, 1));
    }

    #[test]
    fn rejection_text() {
        let r = run(b"SELECT 1;\n\tSELECT 'x'; \\! id \x01 \xff\n").unwrap_err();
        assert_eq!(
            r.to_string(),
            format!("line 2: {}: \\tSELECT 'x'; \\! id \\x01 \u{fffd}", r.reason)
        );
        let long = format!("\\! {}\n", "x".repeat(200));
        assert_eq!(
            run(long.as_bytes()).unwrap_err().excerpt.chars().count(),
            EXCERPT_CHARS + 1
        );
    }

    #[test]
    fn variables() {
        accepted("SELECT a[1:2], b[1:n], c::text, d := 1;\n");
        refused("SELECT :DBNAME;\n", 1);
        accepted("SELECT :'DBNAME', :\"x\";\n");
    }
}
