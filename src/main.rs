//! The `tokenwarden` binary: see the library's [`tokenwarden::cli`].

#[global_allocator]
static ALLOCATOR: tokenwarden::allocator::Allocator = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    tokenwarden::cli::main()
}
