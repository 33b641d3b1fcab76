//! The `immich-backup` command: a thin layer of argument parsing and printing over the library.

mod cli;

fn main() {
    std::process::exit(cli::main());
}
