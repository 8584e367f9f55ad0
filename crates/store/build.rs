// Rebuild when a migration is added, so the embedded MIGRATOR is never stale.
fn main() {
    println!("cargo:rerun-if-changed=../../migrations");
}
