//! The reference docs against the code: every error code in the protocol's table and the admin
//! API's `ErrorName`, every setting in the README's table.

use imgate_shared::ErrorCode;
use serde_json::Value;

fn read(path: &str) -> String {
    std::fs::read_to_string(format!("{}/../{path}", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

#[test]
fn the_protocol_lists_every_error_code_with_its_number() {
    let doc = read("docs/protocol.md");
    for code in ErrorCode::ALL {
        let row = format!("| {} | `{}` |", code.code(), code.name());
        assert!(doc.contains(&row), "docs/protocol.md lacks the row {row}");
    }
}

#[test]
fn the_openapi_error_names_are_the_error_codes() {
    let doc: Value = serde_json::from_str(&read("docs/openapi.json")).unwrap();
    let mut listed: Vec<&str> = doc["components"]["schemas"]["ErrorName"]["enum"]
        .as_array()
        .expect("ErrorName is an enum")
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    let mut codes: Vec<&str> = ErrorCode::ALL.iter().map(|c| c.name()).collect();
    listed.sort();
    codes.sort();
    assert_eq!(listed, codes);
}

/// `a.b.c` for every leaf of a settings tree.
fn keys(prefix: &str, v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(map) => {
            for (k, v) in map {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                keys(&key, v, out);
            }
        }
        _ => out.push(prefix.to_owned()),
    }
}

#[test]
fn the_readme_names_every_setting() {
    let readme = read("README.md");
    let mut all = Vec::new();
    keys(
        "",
        &serde_json::to_value(imgate::Settings::default()).unwrap(),
        &mut all,
    );
    assert!(all.len() > 50, "{all:?}");
    let missing: Vec<&String> = all
        .iter()
        .filter(|k| {
            // A row names the setting in full, or as `group.a`, `b` after the first of a group.
            let last = k.rsplit('.').next().unwrap();
            !readme.contains(&format!("`{k}`")) && !readme.contains(&format!(", `{last}`"))
        })
        .collect();
    assert!(missing.is_empty(), "README.md does not name {missing:?}");
}
