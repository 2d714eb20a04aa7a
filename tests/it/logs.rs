//! The log schema as documented: README's event table is exactly `logging::SCHEMA` (every event,
//! every field, every type). The emitted logs are checked against the same schema by the daemon,
//! hostile-server and metrics tests (`support::assert_log_schema`).

/// The table README should hold, generated from the schema.
fn expected_table() -> String {
    let mut rows = vec!["| event | fields (type) |".to_owned(), "|---|---|".to_owned()];
    for (event, fields) in segsync::logging::SCHEMA {
        let cell: Vec<String> = fields.iter().map(|(f, k)| format!("`{f}` ({})", k.as_str())).collect();
        rows.push(format!("| `{event}` | {} |", if cell.is_empty() { "—".to_owned() } else { cell.join(", ") }));
    }
    rows.join("\n")
}

// README documents every event and field of the log schema, with its type, and nothing else.
#[test]
fn readme_event_table_is_the_schema() {
    let readme = std::fs::read_to_string("README.md").expect("README.md");
    let expected = expected_table();
    assert!(readme.contains(&expected), "README's event table must read exactly:\n\n{expected}\n");
}
