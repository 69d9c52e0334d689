//! The bearer-token file format, for the tokens a server accepts and the one a cascade tier sends:
//! one token a line, blank lines and surrounding whitespace ignored; each token printable ASCII
//! without spaces, since it travels in a header. Errors name lines, never their content.

/// One token: `text` without its surrounding whitespace.
pub fn one(text: &str) -> Result<&str, String> {
    let token = text.trim();
    if token.is_empty() {
        return Err("the token is empty".into());
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("the token must be printable ASCII without spaces (it travels in a header)".into());
    }
    Ok(token)
}

/// Every token of a file's bytes, in order; an error when it holds none or any line is not a token.
pub fn parse(bytes: &[u8]) -> Result<Vec<&str>, String> {
    let mut tokens = Vec::new();
    for (n, line) in bytes.split(|&b| b == b'\n').enumerate() {
        let line = line.trim_ascii();
        if line.is_empty() {
            continue;
        }
        // Printable ASCII is UTF-8, so only a line that is not a token fails here.
        let token = std::str::from_utf8(line).map_err(|_| not_a_token(n))?;
        tokens.push(one(token).map_err(|_| not_a_token(n))?);
    }
    if tokens.is_empty() {
        return Err("the file holds no token".into());
    }
    Ok(tokens)
}

fn not_a_token(n: usize) -> String {
    format!("line {} is not a token (printable ASCII without spaces: it travels in a header)", n + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_file_holds_one_token_a_line() {
        assert_eq!(parse(b"s3cret\n").unwrap(), ["s3cret"]);
        assert_eq!(parse(b"\r\n  old \r\n\n\tnew\n").unwrap(), ["old", "new"]);
        assert_eq!(parse(b"").unwrap_err(), "the file holds no token");
        assert_eq!(parse(b" \n\n").unwrap_err(), "the file holds no token");
        let err = parse(b"good\ntwo words\n").unwrap_err();
        assert!(err.starts_with("line 2 is not a token"), "{err}");
        assert!(!err.contains("two") && !err.contains("good"), "an error shows no token: {err}");
        assert!(parse("caf\u{e9}\n".as_bytes()).is_err());
        assert!(parse(b"\xff\xfe\n").is_err());
        assert_eq!(one(" s3cret\n").unwrap(), "s3cret");
        assert!(one(" \n").is_err());
        assert!(one("two words").is_err());
        assert!(one("a\nb").is_err(), "an inline token is one token");
    }
}
