//! Regenerate `schemas/` from the Rust types: `cargo run -p crp-core --example generate-schemas`.

use std::path::PathBuf;

fn main() -> std::io::Result<()> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../schemas");
    std::fs::create_dir_all(&dir)?;
    for (stem, schema) in crp_core::schema::all() {
        let path = dir.join(crp_core::schema::file_name(stem));
        std::fs::write(&path, crp_core::schema::render(&schema))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
