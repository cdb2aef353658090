//! The `parallax` binary: see [`parallax::cli`].

fn main() -> std::process::ExitCode {
    parallax::cli::main()
}
