//! The few HTML helpers the page needs: escaping and human-readable numbers.

use std::fmt::Write;

/// `text` made safe as HTML text and as a quoted attribute value: the five characters that can
/// end a text run or an attribute are replaced by their entities. Every string the page did not
/// write itself (repository names, error messages, addresses) goes through this.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// `0.4567` → `45.7 %`.
pub fn percent(ratio: f64) -> String {
    format!("{:.1} %", ratio * 100.0)
}

/// A figure the browser test can read: `<span data-figure="name" data-value="raw">shown</span>`.
/// `raw` is the number as `/metrics` has it.
pub fn figure(out: &mut String, name: &str, raw: &str, shown: &str) {
    let _ = write!(
        out,
        r#"<span class="fig" data-figure="{}" data-value="{}">{}</span>"#,
        escape(name),
        escape(raw),
        escape(shown)
    );
}

/// A table cell holding a count, readable by the browser test.
pub fn count_cell(out: &mut String, name: &str, n: u64) {
    let _ = write!(
        out,
        r#"<td class="num" data-figure="{}" data-value="{n}">{n}</td>"#,
        escape(name)
    );
}

/// A plain table cell with escaped text.
pub fn cell(out: &mut String, text: &str) {
    let _ = write!(out, "<td>{}</td>", escape(text));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escape_leaves_no_markup_in_hostile_input() {
        let hostile = r#"</td><script>alert("x")</script><img src=x onerror='y'>&amp;"#;
        let safe = escape(hostile);
        assert_eq!(
            safe,
            "&lt;/td&gt;&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;&lt;img src=x \
             onerror=&#39;y&#39;&gt;&amp;amp;"
        );
        for c in ['<', '>', '"', '\''] {
            assert!(!safe.contains(c), "{c} left in {safe}");
        }
        // Every & left starts an entity this function wrote.
        let entities = ["&amp;", "&lt;", "&gt;", "&quot;", "&#39;"];
        for (i, _) in safe.match_indices('&') {
            assert!(entities.iter().any(|e| safe[i..].starts_with(e)), "{safe}");
        }
        assert_eq!(escape("library/alpine ünïcode"), "library/alpine ünïcode");
    }

    #[test]
    fn figures_escape_their_name_value_and_text() {
        let mut out = String::new();
        figure(&mut out, "a\"b", "1<2", "<b>");
        assert_eq!(
            out,
            r#"<span class="fig" data-figure="a&quot;b" data-value="1&lt;2">&lt;b&gt;</span>"#
        );
        let mut out = String::new();
        cell(&mut out, "<x>");
        assert_eq!(out, "<td>&lt;x&gt;</td>");
    }

    #[test]
    fn ratios_read_as_percentages() {
        assert_eq!(percent(0.4567), "45.7 %");
        assert_eq!(percent(1.0), "100.0 %");
    }
}
