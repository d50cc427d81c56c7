//! The plain Markdown of `docs/configuration.md` as a man(7) page: headings, paragraphs,
//! one level of `-` bullets, fenced code blocks, inline `code`, **bold** and *emphasis*.
//! That subset is all the docs use for pages that become man pages; anything else is
//! rendered as text, never dropped.

/// Renders `markdown` as a man page `name(section)`; its first `#` heading is the title
/// line's description, and the document's first paragraph after it goes under NAME.
pub fn man_page(markdown: &str, name: &str, section: &str, source: &str, manual: &str) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        ".TH {} {} \"\" \"{}\" \"{}\"\n",
        name.to_ascii_uppercase(),
        section,
        escape_quoted(source),
        escape_quoted(manual)
    ));
    let mut title = None;
    let mut paragraph: Vec<&str> = Vec::new();
    let mut in_code = false;
    let mut in_list_item = false;
    for line in markdown.lines() {
        if in_code {
            if line.trim_start().starts_with("```") {
                out.push_str(".fi\n.RE\n");
                in_code = false;
            } else {
                out.push_str(&code_line(line));
                out.push('\n');
            }
            continue;
        }
        let trimmed = line.trim();
        if trimmed.starts_with("```") {
            flush(&mut out, &mut paragraph, &mut title, name);
            in_list_item = false;
            out.push_str(".PP\n.RS 4\n.nf\n");
            in_code = true;
            continue;
        }
        if trimmed.is_empty() {
            flush(&mut out, &mut paragraph, &mut title, name);
            continue;
        }
        if let Some((level, text)) = heading(trimmed) {
            flush(&mut out, &mut paragraph, &mut title, name);
            in_list_item = false;
            match level {
                1 => {
                    if title.is_none() {
                        title = Some(text.to_string());
                    } else {
                        out.push_str(&format!(
                            ".SH \"{}\"\n",
                            escape_quoted(&text.to_uppercase())
                        ));
                    }
                }
                2 => out.push_str(&format!(
                    ".SH \"{}\"\n",
                    escape_quoted(&text.to_uppercase())
                )),
                _ => out.push_str(&format!(".SS \"{}\"\n", escape_quoted(&strip_inline(text)))),
            }
            continue;
        }
        if let Some(item) = trimmed
            .strip_prefix("- ")
            .or_else(|| trimmed.strip_prefix("* "))
        {
            flush(&mut out, &mut paragraph, &mut title, name);
            out.push_str(".IP \\(bu 2\n");
            paragraph.push(item);
            in_list_item = true;
            continue;
        }
        // A continuation line of a list item stays in the item; anything else is text.
        let _ = in_list_item;
        paragraph.push(trimmed);
    }
    flush(&mut out, &mut paragraph, &mut title, name);
    if in_code {
        out.push_str(".fi\n.RE\n");
    }
    out
}

/// Writes the pending paragraph. The first one after the title becomes the NAME section
/// (`name \- title`) followed by the paragraph as DESCRIPTION's start.
fn flush(out: &mut String, paragraph: &mut Vec<&str>, title: &mut Option<String>, name: &str) {
    if let Some(t) = title.take() {
        out.push_str(".SH NAME\n");
        out.push_str(&format!("{} \\- {}\n", escape(name), inline(&t)));
        out.push_str(".SH DESCRIPTION\n");
    }
    if paragraph.is_empty() {
        return;
    }
    let text = paragraph.join(" ");
    paragraph.clear();
    if !out.ends_with(".IP \\(bu 2\n") {
        out.push_str(".PP\n");
    }
    out.push_str(&protect_line_start(&inline(&text)));
    out.push('\n');
}

fn heading(line: &str) -> Option<(usize, &str)> {
    let level = line.bytes().take_while(|&b| b == b'#').count();
    if level == 0 || level > 6 {
        return None;
    }
    line[level..]
        .strip_prefix(' ')
        .map(|t| (level, t.trim_end_matches('#').trim()))
}

/// Inline markup: `code` and **bold** in bold, *emphasis* and _emphasis_ in italics,
/// `[text](target)` as "text (target)"; everything else escaped.
fn inline(text: &str) -> String {
    let mut out = String::new();
    let chars: Vec<char> = text.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c == '`' {
            if let Some(end) = find(&chars, i + 1, "`") {
                let code: String = chars[i + 1..end].iter().collect();
                out.push_str("\\fB");
                out.push_str(&escape(&code));
                out.push_str("\\fR");
                i = end + 1;
                continue;
            }
        }
        if c == '*' && chars.get(i + 1) == Some(&'*') {
            if let Some(end) = find(&chars, i + 2, "**") {
                let inner: String = chars[i + 2..end].iter().collect();
                out.push_str("\\fB");
                out.push_str(&inline(&inner));
                out.push_str("\\fR");
                i = end + 2;
                continue;
            }
        }
        if (c == '*' || c == '_')
            && chars.get(i + 1).is_some_and(|n| !n.is_whitespace())
            && (i == 0 || !chars[i - 1].is_alphanumeric())
        {
            if let Some(end) = find(&chars, i + 1, &c.to_string()) {
                let closes_word = chars.get(end + 1).is_none_or(|n| !n.is_alphanumeric());
                if end > i + 1 && closes_word {
                    let inner: String = chars[i + 1..end].iter().collect();
                    out.push_str("\\fI");
                    out.push_str(&inline(&inner));
                    out.push_str("\\fR");
                    i = end + 1;
                    continue;
                }
            }
        }
        if c == '[' {
            if let Some(close) = find(&chars, i + 1, "](") {
                if let Some(end) = find(&chars, close + 2, ")") {
                    let label: String = chars[i + 1..close].iter().collect();
                    let target: String = chars[close + 2..end].iter().collect();
                    out.push_str(&inline(&label));
                    out.push_str(" (");
                    out.push_str(&escape(&target));
                    out.push(')');
                    i = end + 1;
                    continue;
                }
            }
        }
        out.push_str(&escape(&c.to_string()));
        i += 1;
    }
    out
}

fn strip_inline(text: &str) -> String {
    text.replace('`', "")
}

fn find(chars: &[char], from: usize, pat: &str) -> Option<usize> {
    let pat: Vec<char> = pat.chars().collect();
    (from..chars.len()).find(|&j| chars[j..].starts_with(&pat))
}

/// Roff's special characters in running text.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\e"),
            '-' => out.push_str("\\-"),
            _ => out.push(c),
        }
    }
    out
}

fn escape_quoted(text: &str) -> String {
    escape(text).replace('"', "\\(dq")
}

/// A line of a code block: escaped, and kept from being read as a request.
fn code_line(line: &str) -> String {
    protect_line_start(&escape(line))
}

/// A line that starts with `.` or `'` would be a roff request: `\&` keeps it text.
fn protect_line_start(line: &str) -> String {
    if line.starts_with('.') || line.starts_with('\'') {
        format!("\\&{line}")
    } else {
        line.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOC: &str = "# The configuration file\n\nmxspool reads one TOML file.\n\n## Keys\n\n### `hostname`\n\nThe **name** in the banner; see *Received:*.\nA second line.\n\n- `max_message_size`: 552 5.3.4\n- a C:\\path\n\n```toml\n.dot = \"a-b\"\n```\n\nSee [the commands](commands.md).\n";

    #[test]
    fn markdown_becomes_man_sections_paragraphs_lists_and_code() {
        let page = man_page(DOC, "mxspool.toml", "5", "mxspool 0.1.0", "mxspool manual");
        let lines: Vec<&str> = page.lines().collect();
        assert_eq!(
            lines[0],
            ".TH MXSPOOL.TOML 5 \"\" \"mxspool 0.1.0\" \"mxspool manual\""
        );
        for want in [
            ".SH NAME",
            "mxspool.toml \\- The configuration file",
            ".SH DESCRIPTION",
            "mxspool reads one TOML file.",
            ".SH \"KEYS\"",
            ".SS \"hostname\"",
            "The \\fBname\\fR in the banner; see \\fIReceived:\\fR. A second line.",
            ".IP \\(bu 2",
            "\\fBmax_message_size\\fR: 552 5.3.4",
            "a C:\\epath",
            ".nf",
            "\\&.dot = \"a\\-b\"",
            ".fi",
            "See the commands (commands.md).",
        ] {
            assert!(lines.contains(&want), "no {want:?} in\n{page}");
        }
        // The list item is not preceded by a stray .PP, the code block is closed.
        let item = lines.iter().position(|l| *l == ".IP \\(bu 2").unwrap();
        assert_ne!(lines[item + 1], ".PP");
        assert!(
            lines.iter().position(|l| *l == ".fi").unwrap()
                > lines.iter().position(|l| *l == ".nf").unwrap()
        );
    }

    #[test]
    fn words_with_underscores_are_not_emphasis() {
        assert_eq!(
            inline("max_message_size and min_free_space"),
            "max_message_size and min_free_space"
        );
        assert_eq!(inline("_only_"), "\\fIonly\\fR");
    }
}
