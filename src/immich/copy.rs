//! PostgreSQL's COPY text format, as `pg_dump` writes table data: the `COPY table (columns) FROM
//! stdin;` header, rows of tab-separated fields with backslash escapes, and the text form of arrays
//! (`{/mnt/photos,"/a b"}`) inside a field.
//!
//! Pure functions over bytes, no I/O: the backup reads Immich's asset paths out of the dump with
//! them while it streams (`backup::consistency`), and restore selects assets with them
//! (`restore::select`); [`connect_target`] tells which database a `\connect` line enters.

use std::borrow::Cow;
use std::ops::Range;

/// A `COPY … FROM stdin;` header: the table as `schema.table` (quotes removed) and its columns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyHeader {
    pub table: String,
    pub columns: Vec<String>,
}

impl CopyHeader {
    /// The position of column `name` (as Immich names it, e.g. `originalPath`).
    pub fn column(&self, name: &str) -> Option<usize> {
        self.columns.iter().position(|c| c == name)
    }
}

/// Parse `COPY public.asset (id, "originalPath") FROM stdin;`; `None` for any other line.
pub fn parse_header(line: &str) -> Option<CopyHeader> {
    let rest = line.strip_prefix("COPY ")?.strip_suffix(" FROM stdin;")?;
    let (table, columns) = match split_unquoted(rest, '(') {
        Some((table, cols)) => (table, cols.trim_end().strip_suffix(')')?),
        None => (rest, ""),
    };
    Some(CopyHeader {
        table: unquote_ident(table.trim()),
        columns: split_list(columns)
            .iter()
            .map(|c| unquote_ident(c.trim()))
            .filter(|c| !c.is_empty())
            .collect(),
    })
}

/// `s` split at the first `sep` outside double quotes.
fn split_unquoted(s: &str, sep: char) -> Option<(&str, &str)> {
    let mut quoted = false;
    for (i, c) in s.char_indices() {
        match c {
            '"' => quoted = !quoted,
            c if c == sep && !quoted => return Some((&s[..i], &s[i + c.len_utf8()..])),
            _ => {}
        }
    }
    None
}

/// A comma-separated list of identifiers, split outside double quotes.
fn split_list(mut s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    while let Some((item, rest)) = split_unquoted(s, ',') {
        out.push(item);
        s = rest;
    }
    out.push(s);
    out
}

/// `public."user"` → `public.user`; `"a""b"` → `a"b`.
pub fn unquote_ident(s: &str) -> String {
    s.trim()
        .replace("\"\"", "\u{0}")
        .replace('"', "")
        .replace('\u{0}', "\"")
}

/// Where the raw (still escaped) fields `0..=last` of one COPY row are, into `out` (cleared first).
/// When the row was cut short (`truncated`: only its beginning was kept), the last field, which may
/// be cut, is left out.
pub fn fields(row: &[u8], truncated: bool, last: usize, out: &mut Vec<Range<usize>>) {
    out.clear();
    let mut start = 0;
    for tab in memchr::memchr_iter(b'\t', row) {
        out.push(start..tab);
        if out.len() > last {
            return;
        }
        start = tab + 1;
    }
    if !truncated {
        out.push(start..row.len());
    }
}

/// Decode one field of the COPY text format: `None` for `\N` (NULL), else its bytes with the
/// escapes (`\\`, `\t`, `\n`, `\r`, `\b`, `\f`, `\v`, octal `\123`, hex `\x41`, any other `\c` = `c`)
/// undone.
pub fn decode_field(raw: &[u8]) -> Option<Vec<u8>> {
    if raw == b"\\N" {
        return None;
    }
    let mut out = Vec::with_capacity(raw.len());
    let mut i = 0;
    while i < raw.len() {
        let b = raw[i];
        i += 1;
        if b != b'\\' || i == raw.len() {
            out.push(b);
            continue;
        }
        let c = raw[i];
        i += 1;
        match c {
            b'b' => out.push(0x08),
            b'f' => out.push(0x0c),
            b'n' => out.push(b'\n'),
            b'r' => out.push(b'\r'),
            b't' => out.push(b'\t'),
            b'v' => out.push(0x0b),
            b'0'..=b'7' => {
                let mut v = u32::from(c - b'0');
                let mut n = 1;
                while n < 3 && i < raw.len() && (b'0'..=b'7').contains(&raw[i]) {
                    v = v * 8 + u32::from(raw[i] - b'0');
                    i += 1;
                    n += 1;
                }
                out.push(v as u8);
            }
            b'x' if i < raw.len() && raw[i].is_ascii_hexdigit() => {
                let mut v = 0u32;
                let mut n = 0;
                while n < 2 && i < raw.len() && raw[i].is_ascii_hexdigit() {
                    v = v * 16 + (raw[i] as char).to_digit(16).expect("hex digit");
                    i += 1;
                    n += 1;
                }
                out.push(v as u8);
            }
            other => out.push(other),
        }
    }
    Some(out)
}

/// A decoded field as text (`None` for NULL); bytes that are not UTF-8 are replaced. A field
/// without escapes is not copied.
pub fn text_field(raw: &[u8]) -> Option<Cow<'_, str>> {
    if memchr::memchr(b'\\', raw).is_none() {
        return Some(String::from_utf8_lossy(raw));
    }
    decode_field(raw).map(|b| match String::from_utf8(b) {
        Ok(s) => Cow::Owned(s),
        Err(e) => Cow::Owned(String::from_utf8_lossy(e.as_bytes()).into_owned()),
    })
}

/// The elements of a one-dimensional array in PostgreSQL's text form (`{a,"b c",NULL}`, after
/// the COPY escapes are undone); NULL elements are left out.
pub fn parse_text_array(s: &str) -> Vec<String> {
    let inner = s
        .trim()
        .strip_prefix('{')
        .and_then(|r| r.strip_suffix('}'))
        .unwrap_or("");
    let mut out = Vec::new();
    let mut chars = inner.chars().peekable();
    while chars.peek().is_some() {
        let mut item = String::new();
        let mut quoted = false;
        if chars.peek() == Some(&'"') {
            chars.next();
            quoted = true;
            while let Some(c) = chars.next() {
                match c {
                    '\\' => item.extend(chars.next()),
                    '"' => break,
                    c => item.push(c),
                }
            }
        }
        while let Some(c) = chars.next() {
            match c {
                ',' => break,
                '\\' => item.extend(chars.next()),
                c if !quoted => item.push(c),
                _ => {}
            }
        }
        if quoted || !item.trim().eq_ignore_ascii_case("NULL") {
            out.push(if quoted {
                item
            } else {
                item.trim().to_string()
            });
        }
    }
    out
}

/// The database named by a `\connect` line: `immich`, `"my db"`, or `-reuse-previous=on "dbname='immich'"`.
pub fn connect_target(rest: &str) -> String {
    if let Some(start) = rest.find("dbname='") {
        let tail = &rest[start + 8..];
        let mut out = String::new();
        let mut chars = tail.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '\\' => {
                    if let Some(n) = chars.next() {
                        out.push(n)
                    }
                }
                '\'' => break,
                c => out.push(c),
            }
        }
        return out;
    }
    let rest = rest.trim();
    if rest.starts_with('"') {
        return unquote_ident(rest);
    }
    unquote_ident(rest.split_whitespace().last().unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_give_the_table_and_its_columns() {
        let h = parse_header(
            "COPY public.asset (id, \"deviceAssetId\", \"originalPath\", \"a,b\", \"q\"\"x\") FROM stdin;",
        )
        .unwrap();
        assert_eq!(h.table, "public.asset");
        assert_eq!(
            h.columns,
            ["id", "deviceAssetId", "originalPath", "a,b", "q\"x"]
        );
        assert_eq!(h.column("originalPath"), Some(2));
        assert_eq!(h.column("sidecarPath"), None);
        let u = parse_header("COPY public.\"user\" (id) FROM stdin;").unwrap();
        assert_eq!(u.table, "public.user");
        assert_eq!(
            parse_header("COPY public.t FROM stdin;").unwrap().columns,
            Vec::<String>::new()
        );
        assert!(parse_header("COPY public.t (a) TO stdout;").is_none());
        assert!(parse_header("SELECT 1;").is_none());
    }

    #[test]
    fn copy_escapes_are_decoded() {
        let cases: [(&[u8], Option<&[u8]>); 9] = [
            (b"\\N", None),
            (b"plain/path.jpg", Some(b"plain/path.jpg")),
            (b"a\\\\b", Some(b"a\\b")),
            (b"tab\\there", Some(b"tab\there")),
            (b"new\\nline\\r", Some(b"new\nline\r")),
            (b"oct\\101\\7", Some(b"octA\x07")),
            (b"hex\\x41\\x4a", Some(b"hexAJ")),
            (b"other\\q", Some(b"otherq")),
            (b"\\N\\N", Some(b"NN")),
        ];
        for (raw, want) in cases {
            assert_eq!(
                decode_field(raw).as_deref(),
                want,
                "{}",
                String::from_utf8_lossy(raw)
            );
        }
        // UTF-8 survives (pg_dump writes it as it is); octal escapes make bytes, not characters.
        assert_eq!(
            text_field("caf\u{e9} \\303\\251".as_bytes()).unwrap(),
            "café é"
        );
    }

    #[test]
    fn rows_split_at_tabs_and_a_cut_row_loses_its_last_field() {
        let row = b"1\t/data/a\\tb.jpg\t\\N\tlast";
        let mut f = Vec::new();
        fields(row, false, 9, &mut f);
        assert_eq!(f.len(), 4);
        assert_eq!(decode_field(&row[f[1].clone()]).unwrap(), b"/data/a\tb.jpg");
        assert_eq!(decode_field(&row[f[2].clone()]), None);
        assert_eq!(&row[f[3].clone()], b"last");
        fields(row, true, 9, &mut f);
        assert_eq!(f.len(), 3);
        // Only what is asked for is split.
        fields(row, false, 1, &mut f);
        assert_eq!(f.len(), 2);
        fields(b"", false, 3, &mut f);
        assert_eq!((f.len(), f[0].clone()), (1, 0..0));
    }

    #[test]
    fn text_arrays() {
        assert_eq!(parse_text_array("{/mnt/photos}"), ["/mnt/photos"]);
        assert_eq!(
            parse_text_array(r#"{/mnt/a,"/mnt/b c","/q\"x\\y",NULL,"NULL"}"#),
            ["/mnt/a", "/mnt/b c", "/q\"x\\y", "NULL"]
        );
        assert!(parse_text_array("{}").is_empty());
        assert!(parse_text_array("").is_empty());
    }
}
