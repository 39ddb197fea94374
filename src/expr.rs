//! GSEKit `expression_scope` expressions: parsing and matching of one field.
//!
//! GSEKit (BlueKing's process configuration manager, GitHub
//! `TencentBlueKing/bk-process-config-manager`) selects processes with one
//! expression per topology field: `bk_set_name`, `bk_module_name`,
//! `service_instance_name`, `bk_process_name` and `bk_process_id`. This module
//! is a from-scratch Rust implementation of how one such expression matches one
//! name. It was written from a reading of
//! `apps/gsekit/utils/expression_utils/{parse,match,range2re,serializers,tests}.py`,
//! `apps/gsekit/constants.py`, `apps/gsekit/process/handlers/process.py`, and
//! the `fnmatch` module of Python 3.7, the version named in GSEKit's
//! `runtime.txt`.
//!
//! # What GSEKit does
//!
//! GSEKit rewrites an expression into a set of ordinary shell glob patterns, then
//! says a name matches if any pattern matches it (`parse.py`, `match.py`).
//!
//! 1. **Bracket groups.** The expression is scanned from left to right. Each `[`
//!    opens a group that ends at the first `]` after it. Groups do not nest. A `[`
//!    with no `]` after it is a syntax error. Text outside groups is copied
//!    unchanged; it can contain `]`, `*` and `?`.
//! 2. **Group bodies.** The text between the brackets is classified by the
//!    first rule that applies:
//!    - it starts with `!`: it is kept as a negated glob class `[!...]`. The
//!      class is the whole body, commas included, so `[!a, b]` is one character
//!      that is not `a`, `,`, space or `b`;
//!    - it contains `,`: a word list. The body is split at every comma, leading
//!      and trailing whitespace is removed from each element, and each element
//!      is classified again with these same rules. So `[1-3, 7, !x]` works. An
//!      empty element stands for the empty string, so `a[x,]` matches `ax` and
//!      `a`;
//!    - it has exactly one `-`, and each side is a single letter, the two
//!      letters are both lower case or both not, and the first comes before the
//!      second: a glob class such as `[a-c]`;
//!    - it has exactly one `-`, each side is a decimal number, and the first
//!      number is smaller: an integer range. It matches the decimal spelling of
//!      each integer in the range, with no leading zeros (`0` for zero). GSEKit
//!      builds digit-class glob patterns for this (`range2re.py`). For example,
//!      `1-105` becomes `[1-9]`, `[1-9][0-9]` and `10[0-5]`;
//!    - anything else is a literal word. This covers descending or equal ranges
//!      (`9-1`, `1-1`), mixed-case letter ranges (`a-C`), `1 - 3`, `1-2-3` and the
//!      empty body `[]`.
//!
//!    Whitespace is removed only from word-list elements. A body that is not a
//!    word list is used as written, so `[ 1-3]` is the literal word ` 1-3`.
//! 3. **Expansion.** The alternatives from all groups are combined with the
//!    text around them as a cartesian product. For example, `4[6, 8, 9]` gives
//!    the patterns `46`, `48` and `49`.
//! 4. **Glob.** Each pattern goes through Python's `fnmatch.fnmatch`, which is
//!    case-sensitive on Linux. A pattern must match the whole name. `*` matches
//!    any run of characters, including an empty one, `.` and newlines. `?`
//!    matches one character. `[seq]` and `[!seq]` are character classes; in a
//!    class, `x-y` is a range read from left to right, a `]` in first place is a
//!    literal `]`, and a `-` in first or last place is a literal `-`. A `[` with no
//!    closing `]` is a literal `[`. There is no escape character: `\` is an
//!    ordinary character. Matching works on characters, not bytes, so Chinese
//!    names and spaces behave as expected.
//!
//! Expanded strings go straight to fnmatch, so glob metacharacters in word-list
//! elements keep their meaning. `[a*, b?]` matches `abc` and `bx`, and the body
//! `!x` in a list (`[a, !x]`) becomes the class `[!x]`.
//!
//! # How this module matches
//!
//! Building the whole product is exponential in the number of groups, so this
//! module does not do it. Each group becomes a list of alternatives. Each
//! alternative is tokenised as a glob on its own. Matching then tracks the set
//! of positions in the name that can be reached after each token, so there is no
//! backtracking, and the cost is O(tokens x name length).
//!
//! Integer ranges are one token. The token accepts a run of ASCII digits with no
//! leading zero (or a lone `0`) whose value lies between the bounds. The
//! comparison is done on digit strings, so bounds of any length work without
//! allocating patterns. Checks against `range2re.py` found that its patterns
//! match exactly this set of strings.
//!
//! Tokenising each alternative on its own gives the same result as tokenising
//! the concatenated string, with one exception. The exception is an alternative
//! that holds a `[` that is not closed inside that alternative. This can only
//! happen when a body contains a literal `[` (for example `[[a, b]c]`), or when
//! the body is just `!` (GSEKit turns it into `[!]`). Python's fnmatch can then
//! close that `[` with a `]` from the text that follows. For these expressions
//! the module does what GSEKit does: it builds every expanded pattern string
//! (integer ranges use the same digit-class patterns as `range2re.py`) and tries
//! each one. This fallback is capped at 10 000 patterns and 64 KiB of pattern
//! text (as many characters as an expression may have, so that its compiled
//! form is never larger than a plain expression's), and numeric bounds are
//! limited to 100 digits in this path.
//! Exceeding a limit is an error, never a hang.
//!
//! # Choices and known differences
//!
//! - **Empty expression.** An empty expression, or one made only of `*`,
//!   matches everything. GSEKit's serializer (`serializers.py`,
//!   `ExpresssionScopeSerializer.validate`) turns a blank field into `*`.
//!   Calling GSEKit's `match()` directly with `""` would match only the empty
//!   name. [`Expression::parse_scope_field`] also copies DRF's `CharField`
//!   habit of stripping surrounding whitespace first.
//! - **Reversed class ranges.** A reversed range inside a glob class, such as
//!   `[!z-a]`, makes Python 3.7's fnmatch raise `re.error` ("bad character
//!   range"), and GSEKit's `list_match` fails. [`Expression::parse`] returns
//!   [`ExprError::ReversedClassRange`] instead. Python 3.9 and later would
//!   quietly match nothing.
//! - **Unicode classification.** Python's `isdecimal` (category Nd) comes from a
//!   built-in table for Unicode 11, which is Python 3.7's version. So
//!   `[１-３]`, written with full-width digits, is the ASCII range `1`..`3`, as in
//!   GSEKit. Python's `isalpha` (categories L*) is approximated by
//!   `char::is_alphabetic` minus numeric characters and enclosed-letter
//!   symbols. The two can still differ for a lone combining mark used as a range
//!   end and for characters added after Unicode 11. `islower` is
//!   `char::is_lowercase`, and whitespace stripping uses Python's `isspace`,
//!   which includes `\x1c`-`\x1f`.
//! - **Size.** Expressions longer than 65 536 characters are rejected.
//! - **One field at a time.** GSEKit joins the five field expressions with
//!   `EXPRESSION_SPLITTER` (`"<-GSEKIT->"`, from `constants.py`, used by
//!   `serializers.gen_expression`). It matches the joined string against each
//!   process's stored joined name (`process.py`,
//!   `ProcessHandler.expression_scope_to_scope`). Matching each field on its own
//!   and requiring all fields to match gives the same answer, with two pathological
//!   exceptions: a `[` left open in one field that is closed by a `]` in a later
//!   field (here an unclosed `[` is always an error), and names that contain the
//!   splitter text.
//! - **Not handled here.** `bk_process_id` can also be a slice, matching
//!   `^\[([-+]?\d+)?\s?:\s?([-+]?\d+)?]` (`match.py` `SLICE_PATTERN`).
//!   `process.py` checks for a slice at the start of the field before it
//!   matches anything. If it finds one, it matches with `*` for that field and
//!   then applies a Python-style slice to the ordered list of matched process
//!   ids. If the text does not contain exactly one slice, nothing is sliced
//!   (`execute_slice`). This acts on the list, not on a name, so callers must
//!   handle it. Passed to [`Expression::parse`], `[0:10]` is just the literal
//!   word `0:10`.

use std::cmp::Ordering;
use std::fmt;
use std::str::FromStr;

/// Longest expression (in characters) accepted by [`Expression::parse`].
const MAX_EXPRESSION_CHARS: usize = 65_536;
/// Most glob patterns the literal-expansion fallback may build.
const MAX_EXPANDED_PATTERNS: usize = 10_000;
/// Most pattern bytes (summed over all patterns) the fallback may build: each becomes a
/// token of the compiled form, so this bounds its memory as [`MAX_EXPRESSION_CHARS`] bounds a
/// plain expression's.
const MAX_EXPANDED_CHARS: usize = 64 * 1024;
/// Longest integer-range bound (in digits) the fallback will expand.
const MAX_FALLBACK_RANGE_DIGITS: usize = 100;

/// A parsed GSEKit expression.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expression {
    text: String,
    program: Program,
}

/// Why an expression was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExprError {
    /// A `[` has no `]` after it. `position` is the 0-based character offset
    /// of the `[`.
    #[error("expression `{expr}`: `[` at character {position} has no closing `]`")]
    UnclosedBracket {
        /// The expression as given.
        expr: String,
        /// 0-based character offset of the unmatched `[`.
        position: usize,
    },
    /// After expansion, a glob character class contains a descending range
    /// such as `z-a`. GSEKit's Python 3.7 fnmatch rejects this with "bad
    /// character range".
    #[error(
        "expression `{expr}`: character class range `{start}-{end}` is reversed (bad character range)"
    )]
    ReversedClassRange {
        /// The expression as given.
        expr: String,
        /// First character of the offending range.
        start: char,
        /// Last character of the offending range.
        end: char,
    },
    /// The expression needs literal expansion into glob patterns, and there
    /// would be more than `limit` of them.
    #[error("expression `{expr}` expands to more than {limit} glob patterns")]
    TooManyAlternatives {
        /// The expression as given.
        expr: String,
        /// The pattern-count limit.
        limit: usize,
    },
    /// The expression needs literal expansion into glob patterns, and they
    /// would hold more than `limit` bytes in total, or an integer-range
    /// bound is too long to expand.
    #[error("expression `{expr}` is too large to expand (limit {limit} bytes of patterns)")]
    ExpansionTooLarge {
        /// The expression as given.
        expr: String,
        /// The total-size limit in bytes.
        limit: usize,
    },
    /// The expression is longer than `limit` characters.
    #[error("expression is {length} characters long; at most {limit} are accepted")]
    TooLong {
        /// Length of the rejected expression, in characters.
        length: usize,
        /// The length limit.
        limit: usize,
    },
}

impl Expression {
    /// Parses `text`. An empty text (or one made only of `*`) matches
    /// everything.
    ///
    /// # Errors
    ///
    /// [`ExprError::UnclosedBracket`] for a `[` with no later `]`,
    /// [`ExprError::ReversedClassRange`] for a glob class such as `[!z-a]`,
    /// [`ExprError::TooLong`] past 65 536 characters, and
    /// [`ExprError::TooManyAlternatives`] / [`ExprError::ExpansionTooLarge`]
    /// when an expression that needs literal expansion is too big to expand.
    pub fn parse(text: &str) -> Result<Expression, ExprError> {
        let length = text.chars().count();
        if length > MAX_EXPRESSION_CHARS {
            return Err(ExprError::TooLong {
                length,
                limit: MAX_EXPRESSION_CHARS,
            });
        }
        let program = if text.chars().all(|c| c == '*') {
            Program::All
        } else {
            compile(text)?
        };
        Ok(Expression {
            text: text.to_owned(),
            program,
        })
    }

    /// Parses a field value as GSEKit's `ExpresssionScopeSerializer` would
    /// receive it. Surrounding whitespace is stripped (DRF `CharField` does
    /// this), and a blank value becomes `*`. [`Expression::as_str`] then
    /// returns the normalised text.
    ///
    /// # Errors
    ///
    /// As for [`Expression::parse`].
    pub fn parse_scope_field(text: &str) -> Result<Expression, ExprError> {
        let trimmed = py_strip(text);
        Expression::parse(if trimmed.is_empty() { "*" } else { trimmed })
    }

    /// Whether `value` (a whole name) matches this expression.
    #[must_use]
    pub fn matches(&self, value: &str) -> bool {
        match &self.program {
            Program::All => true,
            Program::Slots(slots) => run_slots(slots, value),
        }
    }

    /// The size of the compiled form, in tokens (a character, `?`, `*`, a class or a number
    /// range each count one): what matching one name costs, per character of the name.
    #[must_use]
    pub fn size(&self) -> usize {
        match &self.program {
            Program::All => 0,
            Program::Slots(slots) => slots.iter().flatten().map(Vec::len).sum(),
        }
    }

    /// True when the text is empty or made only of `*` (`""`, `"*"`, `"**"`):
    /// such an expression matches every value. Other texts that happen to
    /// match everything, such as `[*]`, report `false`.
    #[must_use]
    pub fn is_match_all(&self) -> bool {
        matches!(self.program, Program::All)
    }

    /// The text this expression was parsed from.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl fmt::Display for Expression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl FromStr for Expression {
    type Err = ExprError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Expression::parse(s)
    }
}

/// Match a value against an optional expression field (None/""/"*" = everything).
#[must_use]
pub fn field_matches(expr: Option<&Expression>, value: &str) -> bool {
    expr.is_none_or(|e| e.matches(value))
}

// ---------------------------------------------------------------------------
// Compiled form
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Eq)]
enum Program {
    /// Matches everything.
    All,
    /// Concatenation of slots. Each slot is a list of alternative token
    /// sequences, and a name matches if some choice of one alternative per
    /// slot matches it.
    Slots(Vec<Vec<Vec<Tok>>>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Tok {
    /// One literal character.
    Char(char),
    /// `?`: any one character.
    Any,
    /// `*`: any run of characters.
    Star,
    /// `[seq]` / `[!seq]`.
    Class(Class),
    /// A GSEKit integer range, in canonical ASCII decimal.
    Number(NumRange),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Class {
    negated: bool,
    /// Inclusive ranges; a single character `c` is stored as `(c, c)`.
    items: Vec<(char, char)>,
}

impl Class {
    fn contains(&self, c: char) -> bool {
        self.items.iter().any(|&(lo, hi)| lo <= c && c <= hi) != self.negated
    }
}

/// Inclusive range of non-negative integers, as canonical decimal strings
/// (ASCII digits, no leading zeros, `"0"` for zero).
#[derive(Debug, Clone, PartialEq, Eq)]
struct NumRange {
    lo: String,
    hi: String,
}

/// One alternative of a bracket group (or the single alternative of a piece
/// of text outside groups).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Alt {
    /// A string handed to fnmatch as-is.
    Glob(String),
    /// An integer range (GSEKit expands it with `range2re`).
    Number(NumRange),
}

// ---------------------------------------------------------------------------
// Parsing (parse.py)
// ---------------------------------------------------------------------------

fn compile(text: &str) -> Result<Program, ExprError> {
    let segments = split_groups(text)?;
    let self_contained = segments.iter().flatten().all(|alt| match alt {
        Alt::Glob(s) => !has_unclosed_bracket(s),
        Alt::Number(_) => true,
    });
    if self_contained {
        let mut slots = Vec::with_capacity(segments.len());
        for segment in &segments {
            let mut slot = Vec::with_capacity(segment.len());
            for alt in segment {
                slot.push(match alt {
                    Alt::Glob(s) => tokenize(s, text)?,
                    Alt::Number(r) => vec![Tok::Number(r.clone())],
                });
            }
            slots.push(slot);
        }
        Ok(Program::Slots(slots))
    } else {
        let patterns = expand_literally(&segments, text)?;
        let mut slot = Vec::with_capacity(patterns.len());
        for pattern in &patterns {
            slot.push(tokenize(pattern, text)?);
        }
        Ok(Program::Slots(vec![slot]))
    }
}

/// Splits `text` into segments, each a list of alternatives. Text outside
/// groups becomes a one-alternative segment.
fn split_groups(text: &str) -> Result<Vec<Vec<Alt>>, ExprError> {
    let mut segments = Vec::new();
    let mut rest = text;
    let mut consumed = 0; // byte offset of `rest` in `text`
    while let Some(open) = rest.find('[') {
        let after = &rest[open + 1..];
        let Some(close) = after.find(']') else {
            return Err(ExprError::UnclosedBracket {
                expr: text.to_owned(),
                position: text[..consumed + open].chars().count(),
            });
        };
        if open > 0 {
            segments.push(vec![Alt::Glob(rest[..open].to_owned())]);
        }
        let mut alts = Vec::new();
        classify_body(&after[..close], &mut alts);
        segments.push(alts);
        let next = open + 1 + close + 1;
        consumed += next;
        rest = &rest[next..];
    }
    if !rest.is_empty() {
        segments.push(vec![Alt::Glob(rest.to_owned())]);
    }
    Ok(segments)
}

/// Classifies a group body (or word-list element) and appends its
/// alternatives to `out`, following `get_match_type` / `parse_enum_expression`.
fn classify_body(body: &str, out: &mut Vec<Alt>) {
    if body.starts_with('[') && body.ends_with(']') {
        // GSEKit's BUILD_IN_ENUM: kept verbatim. A body never contains `]`,
        // so this cannot happen here, but the rule is kept for fidelity.
        out.push(Alt::Glob(body.to_owned()));
    } else if body.starts_with('!') {
        out.push(Alt::Glob(format!("[{body}]")));
    } else if body.contains(',') {
        for element in body.split(',') {
            classify_body(py_strip(element), out);
        }
    } else if let Some(alt) = classify_range(body) {
        out.push(alt);
    } else {
        out.push(Alt::Glob(body.to_owned()));
    }
}

/// `a-c` style letter ranges and `1-100` style integer ranges. Returns
/// `None` when the body is a literal word.
fn classify_range(body: &str) -> Option<Alt> {
    let (begin, end) = body.split_once('-')?;
    if end.contains('-') {
        return None;
    }
    if let (Some(b), Some(e)) = (single_char(begin), single_char(end))
        && b.is_lowercase() == e.is_lowercase()
        && py_is_alpha(b)
        && py_is_alpha(e)
        && b < e
    {
        return Some(Alt::Glob(format!("[{body}]")));
    }
    let lo = py_decimal(begin)?;
    let hi = py_decimal(end)?;
    (cmp_num(&lo, &hi) == Ordering::Less).then_some(Alt::Number(NumRange { lo, hi }))
}

fn single_char(s: &str) -> Option<char> {
    let mut chars = s.chars();
    let c = chars.next()?;
    chars.next().is_none().then_some(c)
}

// ---------------------------------------------------------------------------
// Python string predicates
// ---------------------------------------------------------------------------

/// Python `str.isspace` for one character. This is Unicode White_Space plus
/// the information separators U+001C..U+001F.
fn py_is_space(c: char) -> bool {
    c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c)
}

/// Python `str.strip()` with no arguments.
fn py_strip(s: &str) -> &str {
    s.trim_matches(py_is_space)
}

/// Approximates Python `str.isalpha` for one character (general category L*):
/// Unicode Alphabetic, minus letter-numbers (Nl) and enclosed-letter symbols.
fn py_is_alpha(c: char) -> bool {
    const ENCLOSED_LETTERS: [(char, char); 4] = [
        ('\u{24B6}', '\u{24E9}'),
        ('\u{1F130}', '\u{1F149}'),
        ('\u{1F150}', '\u{1F169}'),
        ('\u{1F170}', '\u{1F189}'),
    ];
    c.is_alphabetic()
        && !c.is_numeric()
        && !ENCLOSED_LETTERS.iter().any(|&(lo, hi)| lo <= c && c <= hi)
}

/// The code point of digit zero for every Unicode 11 (Python 3.7)
/// decimal-digit (Nd) block. Each block holds the digits 0-9 in order.
const DECIMAL_ZEROS: [u32; 61] = [
    0x30, 0x660, 0x6f0, 0x7c0, 0x966, 0x9e6, 0xa66, 0xae6, 0xb66, 0xbe6, 0xc66, 0xce6, 0xd66,
    0xde6, 0xe50, 0xed0, 0xf20, 0x1040, 0x1090, 0x17e0, 0x1810, 0x1946, 0x19d0, 0x1a80, 0x1a90,
    0x1b50, 0x1bb0, 0x1c40, 0x1c50, 0xa620, 0xa8d0, 0xa900, 0xa9d0, 0xa9f0, 0xaa50, 0xabf0, 0xff10,
    0x104a0, 0x10d30, 0x11066, 0x110f0, 0x11136, 0x111d0, 0x112f0, 0x11450, 0x114d0, 0x11650,
    0x116c0, 0x11730, 0x118e0, 0x11c50, 0x11d50, 0x11da0, 0x16a60, 0x16b50, 0x1d7ce, 0x1d7d8,
    0x1d7e2, 0x1d7ec, 0x1d7f6, 0x1e950,
];

/// The value of `c` if it is a Unicode decimal digit (Python `isdecimal`).
fn decimal_digit(c: char) -> Option<u8> {
    let cp = u32::from(c);
    let idx = DECIMAL_ZEROS.partition_point(|&zero| zero <= cp);
    let zero = DECIMAL_ZEROS[..idx].last()?;
    u8::try_from(cp - zero).ok().filter(|d| *d <= 9)
}

/// `int(s)` for strings where Python's `s.isdecimal()` is true. Returns the
/// canonical ASCII decimal form, or `None` if `s` is not decimal.
fn py_decimal(s: &str) -> Option<String> {
    if s.is_empty() {
        return None;
    }
    let mut digits = String::with_capacity(s.len());
    for c in s.chars() {
        let d = decimal_digit(c)?;
        if !(digits.is_empty() && d == 0) {
            digits.push(char::from(b'0' + d));
        }
    }
    if digits.is_empty() {
        digits.push('0');
    }
    Some(digits)
}

/// Compares canonical decimal strings numerically.
fn cmp_num(a: &str, b: &str) -> Ordering {
    a.len().cmp(&b.len()).then_with(|| a.cmp(b))
}

// ---------------------------------------------------------------------------
// fnmatch tokenisation (Python 3.7 fnmatch.translate semantics)
// ---------------------------------------------------------------------------

/// For the `[` at `open`, the index of the `]` that closes it under fnmatch's
/// rules, or `None` if it stays a literal `[`.
fn class_end(cs: &[char], open: usize) -> Option<usize> {
    let mut j = open + 1;
    if cs.get(j) == Some(&'!') {
        j += 1;
    }
    if cs.get(j) == Some(&']') {
        j += 1;
    }
    cs.get(j..)?
        .iter()
        .position(|&c| c == ']')
        .map(|offset| j + offset)
}

/// Whether fnmatch would treat some `[` in `s` as a literal for lack of a `]`.
fn has_unclosed_bracket(s: &str) -> bool {
    let cs: Vec<char> = s.chars().collect();
    let mut i = 0;
    while i < cs.len() {
        if cs[i] == '[' {
            match class_end(&cs, i) {
                Some(end) => i = end + 1,
                None => return true,
            }
        } else {
            i += 1;
        }
    }
    false
}

fn tokenize(pattern: &str, expr: &str) -> Result<Vec<Tok>, ExprError> {
    let cs: Vec<char> = pattern.chars().collect();
    let mut toks = Vec::with_capacity(cs.len());
    let mut i = 0;
    while i < cs.len() {
        let c = cs[i];
        match c {
            '*' => {
                if toks.last() != Some(&Tok::Star) {
                    toks.push(Tok::Star);
                }
                i += 1;
            }
            '?' => {
                toks.push(Tok::Any);
                i += 1;
            }
            '[' => match class_end(&cs, i) {
                Some(end) => {
                    toks.push(Tok::Class(parse_class(&cs[i + 1..end], expr)?));
                    i = end + 1;
                }
                None => {
                    toks.push(Tok::Char('['));
                    i += 1;
                }
            },
            _ => {
                toks.push(Tok::Char(c));
                i += 1;
            }
        }
    }
    Ok(toks)
}

/// Parses the text between `[` and `]` (never empty, by construction).
fn parse_class(content: &[char], expr: &str) -> Result<Class, ExprError> {
    let (negated, body) = match content.split_first() {
        Some((&'!', rest)) => (true, rest),
        _ => (false, content),
    };
    let mut items = Vec::new();
    let mut k = 0;
    while k < body.len() {
        let start = body[k];
        match (body.get(k + 1), body.get(k + 2)) {
            (Some(&'-'), Some(&end)) => {
                if end < start {
                    return Err(ExprError::ReversedClassRange {
                        expr: expr.to_owned(),
                        start,
                        end,
                    });
                }
                items.push((start, end));
                k += 3;
            }
            _ => {
                items.push((start, start));
                k += 1;
            }
        }
    }
    Ok(Class { negated, items })
}

// ---------------------------------------------------------------------------
// Matching: position-set simulation
// ---------------------------------------------------------------------------

fn run_slots(slots: &[Vec<Vec<Tok>>], value: &str) -> bool {
    let chars: Vec<char> = value.chars().collect();
    let n = chars.len();
    let mut reach = vec![false; n + 1];
    reach[0] = true;
    let mut next = vec![false; n + 1];
    let mut cur = vec![false; n + 1];
    let mut scratch = vec![false; n + 1];
    for slot in slots {
        next.fill(false);
        for pattern in slot {
            cur.copy_from_slice(&reach);
            let mut alive = true;
            for tok in pattern {
                alive = step(tok, &chars, &cur, &mut scratch);
                std::mem::swap(&mut cur, &mut scratch);
                if !alive {
                    break;
                }
            }
            if alive {
                for (acc, &r) in next.iter_mut().zip(cur.iter()) {
                    *acc |= r;
                }
            }
        }
        std::mem::swap(&mut reach, &mut next);
        if !reach.contains(&true) {
            return false;
        }
    }
    reach[n]
}

/// Applies one token to the set of reachable positions `from`, writing the
/// set of positions reachable after it into `to`. Returns whether `to` is
/// non-empty.
fn step(tok: &Tok, chars: &[char], from: &[bool], to: &mut [bool]) -> bool {
    to.fill(false);
    match tok {
        Tok::Star => match from.iter().position(|&r| r) {
            Some(first) => {
                to[first..].fill(true);
                true
            }
            None => false,
        },
        Tok::Number(range) => {
            let mut any = false;
            for (p, _) in from.iter().enumerate().filter(|(_, r)| **r) {
                any |= number_ends(range, &chars[p.min(chars.len())..], p, to);
            }
            any
        }
        single => {
            let mut any = false;
            for (i, &c) in chars.iter().enumerate() {
                if from[i] && single_matches(single, c) {
                    to[i + 1] = true;
                    any = true;
                }
            }
            any
        }
    }
}

fn single_matches(tok: &Tok, c: char) -> bool {
    match tok {
        Tok::Char(x) => *x == c,
        Tok::Any => true,
        Tok::Class(class) => class.contains(c),
        Tok::Star | Tok::Number(_) => false,
    }
}

/// Marks `to[start + len]` for every prefix of `rest` of length `len` that is
/// the canonical decimal form of a number in `range`. Returns whether any was
/// marked.
fn number_ends(range: &NumRange, rest: &[char], start: usize, to: &mut [bool]) -> bool {
    let (lo, hi) = (range.lo.as_str(), range.hi.as_str());
    let digits: String = rest
        .iter()
        .take(hi.len())
        .take_while(|c| c.is_ascii_digit())
        .collect();
    if digits.starts_with('0') {
        // A leading zero is only valid for the number 0 itself.
        let ok = lo == "0";
        if ok {
            to[start + 1] = true;
        }
        return ok;
    }
    let mut any = false;
    for len in lo.len()..=digits.len() {
        let candidate = &digits[..len];
        let at_least_lo = len > lo.len() || candidate >= lo;
        let at_most_hi = len < hi.len() || candidate <= hi;
        if at_least_lo && at_most_hi {
            to[start + len] = true;
            any = true;
        }
    }
    any
}

// ---------------------------------------------------------------------------
// Literal expansion fallback (parse_exp2unix_shell_style + range2re.py)
// ---------------------------------------------------------------------------

fn expand_literally(segments: &[Vec<Alt>], expr: &str) -> Result<Vec<String>, ExprError> {
    let too_many = || ExprError::TooManyAlternatives {
        expr: expr.to_owned(),
        limit: MAX_EXPANDED_PATTERNS,
    };
    let too_large = || ExprError::ExpansionTooLarge {
        expr: expr.to_owned(),
        limit: MAX_EXPANDED_CHARS,
    };
    let mut patterns = vec![String::new()];
    for segment in segments {
        let mut pieces = Vec::new();
        for alt in segment {
            match alt {
                Alt::Glob(s) => pieces.push(s.clone()),
                Alt::Number(r) => {
                    if r.hi.len() > MAX_FALLBACK_RANGE_DIGITS {
                        return Err(too_large());
                    }
                    pieces.extend(range_patterns(&r.lo, &r.hi));
                }
            }
        }
        let count = patterns
            .len()
            .checked_mul(pieces.len())
            .filter(|&c| c <= MAX_EXPANDED_PATTERNS)
            .ok_or_else(too_many)?;
        let prefix_chars: usize = patterns.iter().map(String::len).sum();
        let piece_chars: usize = pieces.iter().map(String::len).sum();
        prefix_chars
            .checked_mul(pieces.len())
            .zip(piece_chars.checked_mul(patterns.len()))
            .and_then(|(a, b)| a.checked_add(b))
            .filter(|&t| t <= MAX_EXPANDED_CHARS)
            .ok_or_else(too_large)?;
        let mut expanded = Vec::with_capacity(count);
        for prefix in &patterns {
            for piece in &pieces {
                expanded.push(format!("{prefix}{piece}"));
            }
        }
        patterns = expanded;
    }
    patterns.sort_unstable();
    patterns.dedup();
    Ok(patterns)
}

/// The digit-class glob patterns GSEKit's `range2re` produces for the
/// inclusive range `lo..=hi` (canonical decimal strings, `lo < hi`).
///
/// The method: from `lo`, greedily take blocks `[x, up(x)]` where `up` turns
/// the trailing zeros and the next digit into 9s, until the range end is
/// reached or passed. From `hi`, take blocks `[down(y), y]` downward in the
/// same way (trailing 9s and the next digit become 0s) until the start of the
/// last upward block is reached. The two overshooting middle blocks are joined
/// when they overlap. Each block then becomes one pattern, digit by digit.
fn range_patterns(lo: &str, hi: &str) -> Vec<String> {
    if cmp_num(lo, hi) != Ordering::Less {
        return vec![lo.to_owned()];
    }
    let mut upward: Vec<(String, String)> = Vec::new();
    let mut start = lo.to_owned();
    while cmp_num(&start, hi) == Ordering::Less {
        let top = fill_up(&start);
        let next = increment(&top);
        upward.push((start, top));
        start = next;
    }
    let mut blocks = upward;
    let Some(mid_left) = blocks.pop() else {
        return vec![lo.to_owned()];
    };
    let mut downward = Vec::new();
    let mut end = Some(hi.to_owned());
    while let Some(e) = end.take() {
        if cmp_num(&mid_left.0, &e) != Ordering::Less {
            break;
        }
        let bottom = fill_down(&e);
        end = decrement(&bottom);
        downward.push((bottom, e));
    }
    downward.reverse();
    if downward.is_empty() {
        blocks.push(mid_left);
    } else {
        let mid_right = downward.remove(0);
        if cmp_num(&mid_right.0, &mid_left.1) == Ordering::Less
            && cmp_num(&mid_left.0, &mid_right.1) == Ordering::Less
        {
            blocks.push((mid_left.0, mid_right.1));
        } else {
            blocks.push(mid_left);
            blocks.push(mid_right);
        }
        blocks.extend(downward);
    }
    blocks.iter().map(|(a, b)| block_pattern(a, b)).collect()
}

/// One block `a..=b` (same digit count) as a glob: equal digits stay, the
/// others become `[x-y]` classes.
fn block_pattern(a: &str, b: &str) -> String {
    let mut out = String::with_capacity(a.len() * 5);
    for (i, da) in a.bytes().enumerate() {
        let db = b.as_bytes().get(i).copied().unwrap_or(da);
        if da == db {
            out.push(char::from(da));
        } else {
            out.extend(['[', char::from(da), '-', char::from(db), ']']);
        }
    }
    out
}

/// `get_upper_range`: turn trailing zeros, and then the first non-zero digit,
/// into 9s.
fn fill_up(x: &str) -> String {
    let mut digits: Vec<u8> = x.bytes().collect();
    for d in digits.iter_mut().rev() {
        let was_zero = *d == b'0';
        *d = b'9';
        if !was_zero {
            break;
        }
    }
    digits.into_iter().map(char::from).collect()
}

/// `get_lower_range`: turn trailing 9s, and then the first other digit, into
/// 0s, and drop the leading zeros this may create.
fn fill_down(x: &str) -> String {
    let mut digits: Vec<u8> = x.bytes().collect();
    for d in digits.iter_mut().rev() {
        let was_nine = *d == b'9';
        *d = b'0';
        if !was_nine {
            break;
        }
    }
    canonical(digits.into_iter().map(char::from).collect())
}

fn canonical(s: String) -> String {
    let trimmed = s.trim_start_matches('0');
    if trimmed.is_empty() {
        "0".to_owned()
    } else if trimmed.len() == s.len() {
        s
    } else {
        trimmed.to_owned()
    }
}

/// `x + 1` for a canonical decimal string.
fn increment(x: &str) -> String {
    let mut digits: Vec<u8> = x.bytes().collect();
    for d in digits.iter_mut().rev() {
        if *d == b'9' {
            *d = b'0';
        } else {
            *d += 1;
            return digits.into_iter().map(char::from).collect();
        }
    }
    let mut out = String::with_capacity(digits.len() + 1);
    out.push('1');
    out.extend(digits.into_iter().map(char::from));
    out
}

/// `x - 1` for a canonical decimal string, or `None` for `"0"`.
fn decrement(x: &str) -> Option<String> {
    if x == "0" {
        return None;
    }
    let mut digits: Vec<u8> = x.bytes().collect();
    for d in digits.iter_mut().rev() {
        if *d == b'0' {
            *d = b'9';
        } else {
            *d -= 1;
            break;
        }
    }
    Some(canonical(digits.into_iter().map(char::from).collect()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn expr(text: &str) -> Expression {
        match Expression::parse(text) {
            Ok(e) => e,
            Err(err) => panic!("`{text}` should parse: {err}"),
        }
    }

    #[track_caller]
    fn check(text: &str, yes: &[&str], no: &[&str]) {
        let e = expr(text);
        for v in yes {
            assert!(e.matches(v), "`{text}` should match {v:?}");
        }
        for v in no {
            assert!(!e.matches(v), "`{text}` should not match {v:?}");
        }
    }

    fn sorted(mut v: Vec<String>) -> Vec<String> {
        v.sort();
        v
    }

    // --- seed examples from the brief ---------------------------------------

    #[test]
    fn seed_chinese_word_list() {
        check(
            "[管控平台, PaaS平台]",
            &["管控平台", "PaaS平台"],
            &[
                "管控",
                "PaaS",
                "管控平台,",
                " PaaS平台",
                "管控平台PaaS平台",
                "",
            ],
        );
    }

    #[test]
    fn seed_digit_suffix_list() {
        check(
            "4[6, 8, 9]",
            &["46", "48", "49"],
            &["4", "47", "469", "6", "4 6"],
        );
    }

    // --- match-all ------------------------------------------------------------

    #[test]
    fn star_matches_everything() {
        for text in ["*", "**", "***"] {
            let e = expr(text);
            assert!(e.is_match_all());
            for v in ["", "a", "a.b.c", "管控平台", " ", "x\ny"] {
                assert!(e.matches(v), "{text} vs {v:?}");
            }
        }
    }

    #[test]
    fn empty_expression_matches_everything() {
        let e = expr("");
        assert!(e.is_match_all());
        assert!(e.matches(""));
        assert!(e.matches("anything"));
        assert_eq!(e.as_str(), "");
    }

    #[test]
    fn is_match_all_only_for_stars() {
        for text in ["a", "*a", "?", "[*]", " ", "*?"] {
            assert!(!expr(text).is_match_all(), "{text}");
        }
    }

    #[test]
    fn field_matches_handles_none_and_some() {
        assert!(field_matches(None, "whatever"));
        assert!(field_matches(None, ""));
        let e = expr("web[1-3]");
        assert!(field_matches(Some(&e), "web2"));
        assert!(!field_matches(Some(&e), "web4"));
        assert!(field_matches(Some(&expr("")), "x"));
        assert!(field_matches(Some(&expr("*")), "x"));
    }

    #[test]
    fn scope_field_normalisation() {
        let blank = Expression::parse_scope_field("  \t ").unwrap();
        assert!(blank.is_match_all());
        assert_eq!(blank.as_str(), "*");
        let trimmed = Expression::parse_scope_field(" nginx ").unwrap();
        assert_eq!(trimmed.as_str(), "nginx");
        assert!(trimmed.matches("nginx"));
        // Plain `parse` keeps surrounding spaces significant.
        check(" nginx ", &[" nginx "], &["nginx"]);
    }

    // --- literals and surrounding text -----------------------------------------

    #[test]
    fn literal_exact_match() {
        check(
            "nginx",
            &["nginx"],
            &["nginx1", "Nginx", "ngin", "xnginx", "", "nginx "],
        );
        check("a.b", &["a.b"], &["axb", "a.bc"]);
    }

    #[test]
    fn text_around_brackets() {
        check(
            "a[1,2]b",
            &["a1b", "a2b"],
            &["ab", "a12b", "a3b", "a1", "1b"],
        );
        check(
            "pre[x, y]-post*",
            &["prex-post", "prey-post", "prey-post-1", "prex-postgres"],
            &[
                "prez-post",
                "pre-post",
                "prex-pos",
                "prexy-post",
                "prex post",
            ],
        );
        check(
            "[a,b][c,d]",
            &["ac", "ad", "bc", "bd"],
            &["ab", "cd", "a", "acd"],
        );
    }

    #[test]
    fn chinese_names() {
        check(
            "游戏服[一, 二]区",
            &["游戏服一区", "游戏服二区"],
            &["游戏服三区", "游戏服区", "游戏服一二区"],
        );
        check(
            "蓝鲸*",
            &["蓝鲸", "蓝鲸平台", "蓝鲸-gse"],
            &["蓝", "智云蓝鲸"],
        );
        check("进程?", &["进程A", "进程一"], &["进程", "进程一二"]);
    }

    #[test]
    fn spaces_inside_names() {
        check("my proc", &["my proc"], &["myproc", "my  proc"]);
        check(
            "[my proc, other one]",
            &["my proc", "other one"],
            &["my proc, other one", " other one", "other one "],
        );
        // Word-list elements are stripped, the top-level body is not.
        check("[ a ,  b ]", &["a", "b"], &[" a ", " b"]);
        check("[ a]", &[" a"], &["a"]);
        check("[ 1-3]", &[" 1-3"], &["1", " 1"]);
        check("[1 - 3]", &["1 - 3"], &["1", "2"]);
    }

    #[test]
    fn python_whitespace_is_stripped_from_elements() {
        // `str.strip()` also removes U+001C..U+001F, which Rust's
        // `char::is_whitespace` does not.
        check("[\u{1c}a\u{1f}, b]", &["a", "b"], &["\u{1c}a\u{1f}"]);
        check("[\u{3000}中\u{3000}, b]", &["中"], &["\u{3000}中"]);
    }

    #[test]
    fn case_sensitive() {
        check("Nginx", &["Nginx"], &["nginx", "NGINX"]);
        check("[a-c]", &["b"], &["B"]);
    }

    // --- letter ranges ----------------------------------------------------------

    #[test]
    fn letter_ranges() {
        check("[a-c]", &["a", "b", "c"], &["d", "A", "ab", "", "a-c"]);
        check("[A-C]x", &["Ax", "Cx"], &["ax", "Dx"]);
        check(
            "proc[a-c, x]",
            &["proca", "procc", "procx"],
            &["procd", "procy"],
        );
    }

    #[test]
    fn invalid_letter_ranges_are_literal() {
        // Descending, equal, mixed case, multi-letter: all literal words.
        check("[z-a]", &["z-a"], &["a", "m", "z"]);
        check("[a-a]", &["a-a"], &["a"]);
        check("[a-C]", &["a-C"], &["b", "B"]);
        check("[A-z]", &["A-z"], &["a", "Z", "_"]);
        check("[ab-cd]", &["ab-cd"], &["ab", "b"]);
        check("[a-]", &["a-"], &["a", "-"]);
        check("[-a]", &["-a"], &["a", "-"]);
        check("[-]", &["-"], &["", "a"]);
    }

    #[test]
    fn unicode_letter_ranges_follow_python_isalpha() {
        // CJK ideographs are letters (Lo) for Python, so this is a class.
        check("[一-十]", &["一", "七", "十"], &["一-十", "a"]);
        // 〇 (U+3007) is a letter-number (Nl), not isalpha: literal word.
        check("[〇-九]", &["〇-九"], &["五"]);
        // Circled letters are symbols (So) for Python: literal word.
        check("[Ⓐ-Ⓒ]", &["Ⓐ-Ⓒ"], &["Ⓑ"]);
    }

    // --- numeric ranges ----------------------------------------------------------

    #[test]
    fn numeric_range_one_to_ten() {
        let yes: Vec<String> = (1..=10).map(|n| n.to_string()).collect();
        let yes: Vec<&str> = yes.iter().map(String::as_str).collect();
        check(
            "[1-10]",
            &yes,
            &["0", "11", "01", "010", "", "1a", "-1", "+1", "１"],
        );
    }

    #[test]
    fn numeric_range_lists() {
        check(
            "[10-19, 30-39]",
            &["10", "15", "19", "30", "39"],
            &["9", "20", "29", "40", "1", "3", "010"],
        );
        check(
            "[1-3, 7]",
            &["1", "2", "3", "7"],
            &["4", "6", "8", "13", "37"],
        );
    }

    #[test]
    fn numeric_range_edges() {
        check("[0-5]", &["0", "3", "5"], &["00", "6", "05", "-0"]);
        check(
            "[0-100]",
            &["0", "9", "10", "99", "100"],
            &["101", "00", "010"],
        );
        check("[99-101]", &["99", "100", "101"], &["98", "102", "9", "10"]);
        // Bounds with leading zeros are read as integers (int("01") == 1).
        check("[01-03]", &["1", "2", "3"], &["01", "02", "03", "0"]);
        check("[0-0]", &["0-0"], &["0"]);
        check("[5-5]", &["5-5"], &["5"]);
    }

    #[test]
    fn numeric_range_composes_with_glob() {
        check("[1-10]*", &["1", "105", "10x", "7abc"], &["0", "x1", "01"]);
        // `*` may take part of the digits: "proc11" is "proc1" + "1".
        check(
            "*[1-10]",
            &["proc1", "proc10", "x010", "proc11"],
            &["proc", "proc0", "10x"],
        );
        check(
            "p[1-3]-[7-9]",
            &["p1-7", "p3-9"],
            &["p1-6", "p4-7", "p1-79"],
        );
    }

    #[test]
    fn descending_and_malformed_ranges_are_literal() {
        check("[9-1]", &["9-1"], &["5", "1", "9"]);
        check("[100-10]", &["100-10"], &["50"]);
        check("[1-2-3]", &["1-2-3"], &["2"]);
        check("[1-100-1009]", &["1-100-1009"], &["50"]);
        check("[1-a]", &["1-a"], &["1", "a"]);
    }

    #[test]
    fn full_width_digits_are_decimal_like_python() {
        // int("１") == 1 in Python, so GSEKit builds the ASCII range 1..3.
        check("[１-３]", &["1", "2", "3"], &["１", "２", "4", "１-３"]);
        check("[1-１２]", &["1", "12"], &["13", "１２"]);
    }

    #[test]
    fn huge_ranges_do_not_hang() {
        let started = std::time::Instant::now();
        check(
            "[1-999999999]",
            &["1", "123456789", "999999999"],
            &["0", "1000000000", "0123"],
        );
        let nines = "9".repeat(5_000);
        let e = expr(&format!("id[1-{nines}]"));
        assert!(e.matches("id1"));
        assert!(e.matches(&format!("id{nines}")));
        assert!(!e.matches(&format!("id1{nines}")));
        assert!(!e.matches("id0"));
        let e = expr("[123456789012345678901234567890-123456789012345678901234567899]");
        assert!(e.matches("123456789012345678901234567895"));
        assert!(!e.matches("123456789012345678901234567889"));
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
    }

    #[test]
    fn big_products_need_no_expansion() {
        // 2^30 combinations; matched without building them.
        let text = "[a, b]".repeat(30);
        let e = expr(&text);
        assert!(e.matches(&"ab".repeat(15)));
        assert!(!e.matches(&"ab".repeat(14)));
        assert!(!e.matches(&format!("{}c", "a".repeat(29))));
    }

    // --- negation, `?`, glob details ------------------------------------------------

    #[test]
    fn negated_class() {
        check("[!a]", &["b", "中", "!", "-"], &["a", "", "bb"]);
        check("x[!0-4]", &["x5", "x9", "xa"], &["x0", "x4", "x", "x55"]);
        // The whole body is one class, commas and spaces included.
        check("[!a, b]", &["c", "x"], &["a", "b", ",", " ", "cd"]);
        // `!x` as a word-list element is a negated class too.
        check("[a, !b]", &["a", "c"], &["b", "ab"]);
    }

    #[test]
    fn question_mark() {
        check(
            "a?c",
            &["abc", "a.c", "a中c", "a c", "a\nc"],
            &["ac", "abbc"],
        );
        check("??", &["ab", "中文"], &["a", "abc"]);
    }

    #[test]
    fn star_details() {
        check("a*", &["a", "a.b.c", "a\nb"], &["", "ba"]);
        check("*.log", &[".log", "x.y.log"], &["log", "x.logs"]);
        check("a*b*c", &["abc", "aXbYc", "abbbc", "acbc"], &["acb", "ab"]);
    }

    #[test]
    fn glob_metacharacters_in_word_list_elements_stay_active() {
        check("[a*, b?]", &["a", "abc", "bx"], &["b", "bxy", "ca"]);
        check("[x?y, z]", &["x1y", "z"], &["xy", "x?"]);
    }

    #[test]
    fn no_escape_character() {
        check(r"a\*", &[r"a\", r"a\xyz"], &["a*", "a"]);
        check(r"[a\, b]", &[r"a\", "b"], &["a"]);
    }

    #[test]
    fn stray_closing_bracket_is_literal() {
        check("a]b", &["a]b"], &["ab"]);
        check("]", &["]"], &[""]);
        check("[1,2]]", &["1]", "2]"], &["1", "2"]);
    }

    #[test]
    fn empty_bodies_and_elements() {
        check("a[]b", &["ab"], &["a b", "a[]b"]);
        check("a[x,]", &["ax", "a"], &["ay"]);
        check("[,]", &[""], &[","]);
    }

    // --- literal `[` and the expansion fallback ---------------------------------

    #[test]
    fn literal_open_bracket() {
        // The body `[` is a word; fnmatch then sees an unclosed `[`: literal.
        check("[[]", &["["], &["", "[]"]);
        check("a[[]b", &["a[b"], &["ab"]);
    }

    #[test]
    fn open_bracket_closed_by_following_text() {
        // GSEKit builds "[ac]d" and "bc]d"; fnmatch reads the first as a class.
        check("[[a, b]c]d", &["ad", "cd", "bc]d"], &["[ac]d", "bd", "acd"]);
        // Body `[a` followed by `b]`: the pattern "[ab]" is a class.
        check("[[a]b]", &["a", "b"], &["[ab]", "ab"]);
        // Body `!` gives "[!]"; with the following "ab]" it becomes the
        // negated class of `]`, `a`, `b`.
        check("[!]ab]", &["c", "中"], &["a", "b", "]", "[!]ab]"]);
        check("[!]", &["[!]"], &["a", "!"]);
    }

    #[test]
    fn open_bracket_absorbing_a_numeric_range() {
        // "[a" + "[1-3]" is the single class {a, [, 1, 2, 3}.
        check("[[a][1-3]", &["a", "[", "2"], &["a1", "4", "]"]);
    }

    #[test]
    fn fallback_expansion_is_capped() {
        let az: Vec<String> = ('a'..='z').map(String::from).collect();
        let ap: Vec<String> = ('a'..='p').map(String::from).collect();
        // 26 × 26 × 16 = 10 816 short patterns (about 43 KiB of text).
        let text = format!("[[][{}][{}][{}]", az.join(","), az.join(","), ap.join(","));
        match Expression::parse(&text) {
            Err(ExprError::TooManyAlternatives { limit, .. }) => assert_eq!(limit, 10_000),
            other => panic!("expected TooManyAlternatives, got {other:?}"),
        }
        let text = format!("[[][1-{}]", "9".repeat(150));
        assert!(matches!(
            Expression::parse(&text),
            Err(ExprError::ExpansionTooLarge { .. })
        ));
        // Long patterns reach the text limit first.
        assert!(matches!(
            Expression::parse(&format!("[[]{}", "[a, b]".repeat(14))),
            Err(ExprError::ExpansionTooLarge { limit: 65_536, .. })
        ));
        // Small fallback expressions are fine.
        check(&format!("[[]{}", "[a, b]".repeat(3)), &["[aba"], &["aba"]);
    }

    // --- errors --------------------------------------------------------------------

    #[test]
    fn unclosed_bracket_is_an_error() {
        for (text, position) in [("[....", 0), ("abc[def", 3), ("a[b]c[", 5), ("中文[a", 2)] {
            match Expression::parse(text) {
                Err(ExprError::UnclosedBracket { expr, position: p }) => {
                    assert_eq!(expr, text);
                    assert_eq!(p, position, "{text}");
                }
                other => panic!("`{text}`: expected UnclosedBracket, got {other:?}"),
            }
        }
        let msg = Expression::parse("ab[cd").unwrap_err().to_string();
        assert!(
            msg.contains("ab[cd") && msg.contains("character 2"),
            "{msg}"
        );
    }

    #[test]
    fn reversed_class_range_is_an_error() {
        match Expression::parse("[!z-a]") {
            Err(ExprError::ReversedClassRange { start, end, .. }) => {
                assert_eq!((start, end), ('z', 'a'));
            }
            other => panic!("expected ReversedClassRange, got {other:?}"),
        }
        assert!(Expression::parse("x[a, !9-1]").is_err());
    }

    #[test]
    fn overlong_expression_is_rejected() {
        let text = "a".repeat(MAX_EXPRESSION_CHARS + 1);
        assert!(matches!(
            Expression::parse(&text),
            Err(ExprError::TooLong { .. })
        ));
        assert!(Expression::parse(&"a".repeat(MAX_EXPRESSION_CHARS)).is_ok());
    }

    #[test]
    fn display_from_str_and_equality() {
        let e: Expression = "web[1-3]".parse().unwrap();
        assert_eq!(e.to_string(), "web[1-3]");
        assert_eq!(e.as_str(), "web[1-3]");
        assert_eq!(e, expr("web[1-3]"));
        assert_ne!(e, expr("web[1-4]"));
        assert!("[".parse::<Expression>().is_err());
    }

    // --- GSEKit apps/gsekit/utils/expression_utils/tests.py ---------------------------

    #[test]
    fn gsekit_test_match() {
        let yes = expr("module-[a-c].proc[1-10].[1-9999]");
        assert!(yes.matches("module-a.proc1.99"));
        let no = expr("module-[!a].proc[1-10].[1-9999]");
        assert!(!no.matches("module-a.proc1.99"));
    }

    #[test]
    fn gsekit_test_list_match() {
        let names = [
            "module-a.proc1.10",
            "module-b.proc2.20",
            "module-c.proc3.30",
            "module-d.proc4.40",
            "module-e.proc5.50",
        ];
        let e = expr("module-[a-d].proc[!2].[10-19, 30-39]");
        let got: Vec<&str> = names.iter().copied().filter(|n| e.matches(n)).collect();
        assert_eq!(got, ["module-a.proc1.10", "module-c.proc3.30"]);
    }

    #[test]
    fn gsekit_test_list_match_service_name_contain_process_name() {
        let sp = "<-GSEKIT->"; // constants.EXPRESSION_SPLITTER
        let a = format!("set{sp}*{sp}127.0.0.1_proc_name{sp}127{sp}50");
        let b = format!("set{sp}*{sp}127.0.0.1_proc_name{sp}12{sp}50");
        let e = expr(&format!("*{sp}*{sp}*{sp}127{sp}*"));
        assert!(e.matches(&a));
        assert!(!e.matches(&b));
    }

    #[test]
    fn gsekit_test_parse_exp2unix_shell_style_main() {
        // Expands to module[1-3].proc[a-c].{[1-9], [1-9][0-9], 100}.
        let e = expr("module[1-3].proc[a-c].[1-100]");
        for v in ["module1.proca.1", "module2.procb.42", "module3.procc.100"] {
            assert!(e.matches(v), "{v}");
        }
        for v in [
            "module4.proca.1",
            "module1.procd.1",
            "module1.proca.0",
            "module1.proca.101",
            "module1.proca.01",
            "module.proca.1",
        ] {
            assert!(!e.matches(v), "{v}");
        }
        check("[!9]", &["8", "a"], &["9", "99"]);
        assert!(matches!(
            Expression::parse("[...."),
            Err(ExprError::UnclosedBracket { position: 0, .. })
        ));
    }

    #[test]
    fn gsekit_test_parse_exp2unix_shell_style_dedup() {
        // Duplicated alternatives change nothing.
        let a = expr("module[1-3, 1-3].proc[a-c].[1-100]");
        let b = expr("module[1-3].proc[a-c].[1-100]");
        for v in [
            "module1.proca.1",
            "module3.procc.100",
            "module4.proca.1",
            "module1.proca.101",
        ] {
            assert_eq!(a.matches(v), b.matches(v), "{v}");
        }
    }

    #[test]
    fn gsekit_match_types() {
        // is_range_format / get_match_type / is_single_alpha_range / is_number_range
        check("[1-100]", &["1", "100"], &["1-100", "101"]);
        check("[1-100-1009]", &["1-100-1009"], &["1"]);
        check("[a-z]", &["q"], &["a-z"]);
        check("[A-Z]", &["Q"], &["q"]);
        check("[1-9]", &["5"], &["1-9", "0"]);
        check("[9-1]", &["9-1"], &["5"]);
        check("[1, 2, 3]", &["1", "2", "3"], &["1, 2, 3", "4"]);
        // parse_word_list_expression("module1, module2, 3,4")
        check(
            "[module1, module2, 3,4]",
            &["module1", "module2", "3", "4"],
            &["module1, module2", " module2", "34"],
        );
        // parse_enum_expression("a-z, 1-100, 1-9")
        check(
            "[a-z, 1-100, 1-9]",
            &["k", "1", "57", "100"],
            &["A", "0", "101", "1-9"],
        );
    }

    #[test]
    fn gsekit_test_range2re() {
        assert_eq!(
            sorted(range_patterns("1", "100")),
            ["100", "[1-9]", "[1-9][0-9]"]
        );
        assert_eq!(
            sorted(range_patterns("1", "105")),
            ["10[0-5]", "[1-9]", "[1-9][0-9]"]
        );
        assert_eq!(range_patterns("0", "1"), ["[0-1]"]);
        assert_eq!(range_patterns("5", "5"), ["5"]);
        assert_eq!(range_patterns("1", "999999999").len(), 9);
    }

    #[test]
    fn gsekit_test_get_upper_and_lower_range() {
        // get_upper_range(100) == (100, 999), get_upper_range(1880) == (1880, 1899)
        assert_eq!(fill_up("100"), "999");
        assert_eq!(fill_up("1880"), "1899");
        assert_eq!(fill_up("0"), "9");
        // get_lower_range(15) == (10, 15), get_lower_range(199) == (0, 199)
        assert_eq!(fill_down("15"), "10");
        assert_eq!(fill_down("199"), "0");
        assert_eq!(fill_down("100"), "100");
    }

    #[test]
    fn range_patterns_match_exactly_the_range() {
        // The fallback's glob patterns and the numeric token must agree.
        for hi in 1..=60u32 {
            for lo in 0..hi {
                let patterns: Vec<Vec<Tok>> = range_patterns(&lo.to_string(), &hi.to_string())
                    .iter()
                    .map(|p| tokenize(p, "").unwrap())
                    .collect();
                let glob = Program::Slots(vec![patterns]);
                let token = Program::Slots(vec![vec![vec![Tok::Number(NumRange {
                    lo: lo.to_string(),
                    hi: hi.to_string(),
                })]]]);
                for n in 0..=70u32 {
                    for v in [n.to_string(), format!("0{n}")] {
                        let want = v == n.to_string() && lo <= n && n <= hi;
                        for program in [&glob, &token] {
                            let Program::Slots(slots) = program else {
                                unreachable!()
                            };
                            assert_eq!(run_slots(slots, &v), want, "{lo}-{hi} vs {v}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn decimal_helpers() {
        assert_eq!(py_decimal("007").as_deref(), Some("7"));
        assert_eq!(py_decimal("000").as_deref(), Some("0"));
        assert_eq!(py_decimal("１２").as_deref(), Some("12"));
        assert_eq!(py_decimal("٣").as_deref(), Some("3"));
        assert_eq!(py_decimal(""), None);
        assert_eq!(py_decimal("1a"), None);
        assert_eq!(py_decimal("²"), None);
        assert_eq!(increment("199"), "200");
        assert_eq!(increment("99"), "100");
        assert_eq!(decrement("100").as_deref(), Some("99"));
        assert_eq!(decrement("0"), None);
        assert_eq!(cmp_num("99", "100"), Ordering::Less);
    }

    #[test]
    fn fnmatch_class_details() {
        let lit = |s: &str| Tok::Char(s.chars().next().unwrap_or('?'));
        // `]` first in a class is literal; `-` first or last is literal.
        check("x[!]]", &["xa"], &["x]"]);
        assert_eq!(tokenize("[]a]", "").unwrap().len(), 1);
        assert_eq!(tokenize("[a", "").unwrap(), [lit("["), lit("a")]);
        let Ok(toks) = tokenize("[-a-c-]", "") else {
            panic!("tokenize failed")
        };
        let [Tok::Class(class)] = toks.as_slice() else {
            panic!("expected one class, got {toks:?}")
        };
        for c in ['-', 'a', 'b', 'c'] {
            assert!(class.contains(c), "{c}");
        }
        assert!(!class.contains('d'));
        assert!(matches!(
            tokenize("[c-a]", ""),
            Err(ExprError::ReversedClassRange { .. })
        ));
    }
}
