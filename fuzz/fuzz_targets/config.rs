//! `Config::parse` on arbitrary UTF-8: Ok or Err, never a panic. An accepted configuration
//! is also turned into a policy and its partner lookups run.

#![no_main]

use libfuzzer_sys::fuzz_target;
use mxspool::config::Config;
use mxspool::policy::Policy;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(config) = Config::parse(text) {
        let _ = Policy::new(&config);
        let _ = config.partner("example.com");
        let _ = config.etrn_allowed("192.0.2.1".parse().unwrap());
    }
});
