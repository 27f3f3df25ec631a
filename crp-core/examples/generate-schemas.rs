//! Regenerate `schemas/` from the Rust types: `cargo run -p crp-core --example generate-schemas`.
//!
//! Writes one `<stem>.schema.json` per entry of `crp_core::schema::all()` and deletes
//! `*.schema.json` files no type generates any more, so the directory matches exactly what
//! the drift test (`cargo test -p crp-core --test schemas`) expects.

use std::collections::BTreeSet;
use std::path::PathBuf;

fn main() -> std::io::Result<()> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../schemas");
    std::fs::create_dir_all(&dir)?;
    let mut written = BTreeSet::new();
    for (stem, schema) in crp_core::schema::all() {
        let name = crp_core::schema::file_name(stem);
        let path = dir.join(&name);
        let text = crp_core::schema::render(&schema);
        let unchanged = std::fs::read_to_string(&path).is_ok_and(|old| old == text);
        if !unchanged {
            std::fs::write(&path, text)?;
            println!("wrote {}", path.display());
        }
        written.insert(name);
    }
    for entry in std::fs::read_dir(&dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.ends_with(".schema.json") && !written.contains(&name) {
            std::fs::remove_file(entry.path())?;
            println!("removed stale {}", entry.path().display());
        }
    }
    println!("{} schemas in {}", written.len(), dir.display());
    Ok(())
}
