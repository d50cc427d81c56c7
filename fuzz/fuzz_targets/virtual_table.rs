//! The sendmail virtusertable parser on arbitrary UTF-8: Ok or Err, never a panic; then
//! lookups of each key-like word of the input in an accepted table.

#![no_main]

use libfuzzer_sys::fuzz_target;
use mxspool::virtual_table::VirtualTable;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(table) = VirtualTable::parse(text) else {
        return;
    };
    assert_eq!(table.is_empty(), table.len() == 0);
    for domain in table.domains() {
        assert!(table.has_domain(domain));
    }
    for word in text.split_whitespace().take(64) {
        let _ = table.lookup(word);
        let _ = table.lookup(&format!("someone{word}"));
        let _ = table.has_domain(word);
    }
});
