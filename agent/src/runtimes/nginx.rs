//! nginx: the kernel programs `agent_nginx_upstream_write{,_done}` (agent-ebpf/src/nginx.rs)
//! on `ngx_chain_writer`, through which every upstream request is written.

use agent_common::RUNTIME_REQUESTS_BY_FD;
use object::{Object, ObjectSymbol};

use super::{Mechanism, Plan};

pub(super) static PLAN: Plan = Plan {
    mechanism: Mechanism::Nginx,
    flags: RUNTIME_REQUESTS_BY_FD,
    probes: &[
        ("agent_nginx_upstream_write", "ngx_chain_writer"),
        ("agent_nginx_upstream_write_done", "ngx_chain_writer"),
    ],
    returns: &[],
};

/// An nginx binary with the http upstream module: it exports both functions (nginx links
/// with `-Wl,-E` so that dynamic modules can call into it).
pub(super) fn applies<'d, R: object::ReadRef<'d>>(file: &object::File<'d, R>) -> bool {
    let mut writer = false;
    let mut upstream = false;
    for sym in file.dynamic_symbols().chain(file.symbols()) {
        match sym.name() {
            Ok("ngx_chain_writer") => writer = true,
            Ok("ngx_http_upstream_init") => upstream = true,
            _ => {}
        }
        if writer && upstream {
            return true;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_nginx(path: &str) -> bool {
        let data = std::fs::read(path)
            .unwrap_or_else(|e| panic!("{path}: {e} (cargo xtask setup installs nginx)"));
        let file = object::File::parse(data.as_slice()).expect("an ELF file");
        applies(&file)
    }

    #[test]
    fn debians_nginx_is_recognised_and_other_programs_are_not() {
        assert!(is_nginx("/usr/sbin/nginx"));
        assert!(!is_nginx("/bin/ls"));
        assert!(!is_nginx(
            &std::env::current_exe().expect("exe").to_string_lossy()
        ));
    }
}
