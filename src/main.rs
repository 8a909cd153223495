//! The `tokenwarden` binary: see the library's [`tokenwarden::cli`].

fn main() -> std::process::ExitCode {
    tokenwarden::cli::main()
}
