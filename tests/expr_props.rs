//! Properties of the GSEKit expression parser (`procagent::expr`), from the semantics its
//! module documents: arbitrary input never panics, plain text matches only itself, integer
//! ranges match exactly the decimal spellings of their integers, word lists match exactly
//! their words, `*` is a prefix/suffix wildcard, and an unclosed `[` is reported where it is.

use procagent::expr::{ExprError, Expression};
use proptest::prelude::*;

fn plain() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9_.-]{1,16}"
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Any expression (heavy on the syntax characters) parses or is refused, and a parsed
    /// one answers for any value, without panicking.
    #[test]
    fn arbitrary_input_never_panics(
        text in "[\\[\\]\\-,!*? a-c0-9\u{4e2d}]{0,40}",
        value in "[a-c0-9\\-,!*? \u{4e2d}]{0,20}",
    ) {
        if let Ok(e) = Expression::parse(&text) {
            let _ = e.matches(&value);
            prop_assert_eq!(e.as_str(), text.as_str());
        }
        let _ = Expression::parse_scope_field(&text);
    }

    /// Text without `[`, `]`, `*` or `?` matches exactly itself.
    #[test]
    fn plain_text_matches_only_itself(a in plain(), b in plain()) {
        let e = Expression::parse(&a).expect("plain text parses");
        prop_assert!(e.matches(&a));
        prop_assert_eq!(e.matches(&b), a == b);
    }

    /// `p[a-b]` with a < b matches `p` followed by the decimal spelling (no leading zero) of
    /// an integer in a..=b, and nothing else of that shape.
    #[test]
    fn integer_ranges_match_exactly_their_integers(
        a in 0u64..2000,
        span in 1u64..3000,
        n in 0u64..6000,
        zeros in 1usize..3,
    ) {
        let b = a + span;
        let e = Expression::parse(&format!("p[{a}-{b}]")).expect("range parses");
        prop_assert_eq!(e.matches(&format!("p{n}")), a <= n && n <= b);
        if n > 0 {
            let padded = format!("p{}{n}", "0".repeat(zeros));
            prop_assert!(!e.matches(&padded), "leading zeros never match");
        }
        prop_assert!(!e.matches("p"));
        let suffixed = format!("p{n}x");
        prop_assert!(!e.matches(&suffixed));
    }

    /// `[w1, w2, ...]` matches exactly its words (whitespace around them ignored).
    #[test]
    fn word_lists_match_exactly_their_words(
        words in proptest::collection::vec("[a-z]{1,6}", 2..5),
        other in "[a-z]{1,6}",
    ) {
        let e = Expression::parse(&format!("x[{}]", words.join(" , "))).expect("list parses");
        for w in &words {
            let with_prefix = format!("x{w}");
            prop_assert!(e.matches(&with_prefix));
        }
        let o = format!("x{other}");
        prop_assert_eq!(e.matches(&o), words.contains(&other));
    }

    /// `P*` matches the values that start with P, `*S` those that end with S.
    #[test]
    fn star_is_a_wildcard(p in plain(), v in "[a-zA-Z0-9_.-]{0,20}") {
        let prefix = Expression::parse(&format!("{p}*")).expect("parses");
        prop_assert_eq!(prefix.matches(&v), v.starts_with(&p));
        let suffix = Expression::parse(&format!("*{p}")).expect("parses");
        prop_assert_eq!(suffix.matches(&v), v.ends_with(&p));
        prop_assert!(Expression::parse("*").expect("parses").matches(&v));
    }

    /// A `[` with no `]` after it is refused, naming its position.
    #[test]
    fn unclosed_brackets_are_reported_where_they_are(head in plain(), tail in "[a-z0-9]{0,8}") {
        let text = format!("{head}[{tail}");
        match Expression::parse(&text) {
            Err(ExprError::UnclosedBracket { position, .. }) => {
                prop_assert_eq!(position, head.chars().count());
            }
            other => prop_assert!(false, "{:?} for {:?}", other, text),
        }
    }
}
