//! A real DNS server on loopback (hickory-server with zones from zone-file text), and the
//! next-hop resolver tested against it: the MX walk of RFC 5321 5.1 as the seed describes it
//! (most preferred first, the backup MX never delivering to itself or a peer).

use std::net::{IpAddr, SocketAddr, TcpListener, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hickory_server::authority::{Catalog, ZoneType};
use hickory_server::proto::rr::{LowerName, Name, RecordType};
use hickory_server::proto::serialize::txt::Parser;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::store::in_memory::InMemoryAuthority;
use hickory_server::ServerFuture;
use mxspool::config::Config;
use mxspool::delivery::mx::{ResolveError, Resolver, Route};

/// An authoritative DNS server on 127.0.0.1 (UDP and TCP, one free port) serving in-memory
/// zones, on its own thread and runtime so synchronous tests and subprocesses can use it.
/// Stops when dropped.
pub struct TestDns {
    pub addr: SocketAddr,
    /// While set, questions for TXT records get no answer (for [`HOLD`]): a server that
    /// drops them, as seen by a resolver that times out.
    pub hold_txt: Arc<AtomicBool>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl TestDns {
    /// `zones`: (origin, zone file text). Panics on a zone that does not parse.
    pub fn start(zones: &[(&str, &str)]) -> TestDns {
        let mut catalog = Catalog::new();
        for (origin, text) in zones {
            let origin = Name::from_ascii(origin).expect("zone origin");
            let (origin, records) = Parser::new(*text, None, Some(origin.clone()))
                .parse()
                .unwrap_or_else(|e| panic!("zone {origin} does not parse: {e}"));
            let authority =
                InMemoryAuthority::new(origin.clone(), records, ZoneType::Primary, false)
                    .unwrap_or_else(|e| panic!("zone {origin}: {e}"));
            catalog.upsert(LowerName::new(&origin), vec![Arc::new(authority)]);
        }
        let (udp, tcp) = bind_udp_and_tcp();
        let addr = udp.local_addr().unwrap();
        udp.set_nonblocking(true).unwrap();
        tcp.set_nonblocking(true).unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let hold_txt = Arc::new(AtomicBool::new(false));
        let gate = Gate {
            catalog,
            hold_txt: hold_txt.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("test-dns".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("test DNS runtime");
                runtime.block_on(async move {
                    let mut server = ServerFuture::new(gate);
                    server.register_socket(tokio::net::UdpSocket::from_std(udp).unwrap());
                    server.register_listener(
                        tokio::net::TcpListener::from_std(tcp).unwrap(),
                        Duration::from_secs(5),
                    );
                    let _ = stopped.await;
                    // Dropping the server and the runtime ends every task.
                });
            })
            .expect("spawn the test DNS thread");
        TestDns {
            addr,
            hold_txt,
            stop: Some(stop),
            thread: Some(thread),
        }
    }
}

impl Drop for TestDns {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// How long a held TXT question waits before it is answered: longer than any resolver waits.
pub const HOLD: Duration = Duration::from_secs(60);

/// The catalog, with TXT answers held back while `hold_txt` is set.
struct Gate {
    catalog: Catalog,
    hold_txt: Arc<AtomicBool>,
}

#[async_trait::async_trait]
impl RequestHandler for Gate {
    async fn handle_request<R: ResponseHandler>(
        &self,
        request: &Request,
        response_handle: R,
    ) -> ResponseInfo {
        let txt = request
            .request_info()
            .is_ok_and(|info| info.query.query_type() == RecordType::TXT);
        if txt && self.hold_txt.load(Ordering::SeqCst) {
            tokio::time::sleep(HOLD).await;
        }
        self.catalog.handle_request(request, response_handle).await
    }
}

/// A UDP socket and a TCP listener on the same free port of 127.0.0.1.
fn bind_udp_and_tcp() -> (UdpSocket, TcpListener) {
    for _ in 0..50 {
        let udp = UdpSocket::bind("127.0.0.1:0").expect("bind UDP 127.0.0.1:0");
        if let Ok(tcp) = TcpListener::bind(udp.local_addr().unwrap()) {
            return (udp, tcp);
        }
    }
    panic!("no port free for both UDP and TCP on 127.0.0.1");
}

/// The seed's example: `example.com.br` has `terra` at preference 0 and the backup
/// `smtp.example.net` (this server in these tests) at 5, plus one name per case.
pub const EXAMPLE_COM_BR: &str = r#"
$ORIGIN example.com.br.
$TTL 300
@           IN SOA   ns1 hostmaster ( 2007080601 3600 600 432000 60 )
            IN NS    ns1
            IN MX    0 terra
            IN MX    5 smtp.example.net.
ns1         IN A     127.0.0.53
terra       IN A     127.0.1.2
            IN A     127.0.1.12
            IN AAAA  2001:db8::2

; two hosts sharing preference 10 (seed case 3), this server behind them
equal       IN MX    10 mx-a
            IN MX    10 mx-b
            IN MX    20 smtp.example.net.
mx-a        IN A     127.0.2.1
mx-b        IN A     127.0.2.2

; this server in the middle of the list
middle      IN MX    0 terra
            IN MX    5 smtp.example.net.
            IN MX    10 mx-b

; this server listed as the best, or the only, MX
inverted    IN MX    0 smtp.example.net.
            IN MX    10 terra
only        IN MX    10 smtp.example.net.
tied        IN MX    10 terra
            IN MX    10 smtp.example.net.

; this server known only by an address: 127.0.0.1 is on lo, 127.0.3.25 is a listen address
byaddr      IN MX    0 terra
            IN MX    5 alias-of-us
alias-of-us IN A     127.0.0.1
bylisten    IN MX    0 terra
            IN MX    5 listener
listener    IN A     127.0.3.25

; an MX target that is an alias (RFC 2181 10.3 forbids it; it still works)
cname       IN MX    0 www
            IN MX    5 smtp.example.net.
www         IN CNAME terra

; RFC 7505 null MX
nullmx      IN MX    0 .

; no MX: the domain's own address is the implicit MX
plain       IN A     127.0.4.1
; no MX and no address
textonly    IN TXT   "v=spf1 -all"

; MX hosts without addresses
dangling    IN MX    0 nowhere
            IN MX    10 terra
allgone     IN MX    0 nowhere
            IN MX    10 nowhere-either
"#;

pub const EXAMPLE_NET: &str = r#"
$ORIGIN example.net.
$TTL 300
@           IN SOA   ns1.example.com.br. hostmaster.example.com.br. ( 1 3600 600 432000 60 )
            IN NS    ns1.example.com.br.
smtp        IN A     127.0.2.3
"#;

pub fn seed_dns() -> TestDns {
    TestDns::start(&[
        ("example.com.br.", EXAMPLE_COM_BR),
        ("example.net.", EXAMPLE_NET),
    ])
}

/// A resolver configured as this server, `smtp.example.net`, asking `dns`.
struct Check {
    runtime: tokio::runtime::Runtime,
    resolver: Resolver,
}

impl Check {
    fn new(nameserver: SocketAddr, extra: &str) -> Check {
        Check::as_host(nameserver, "smtp.example.net", extra)
    }

    fn as_host(nameserver: SocketAddr, hostname: &str, extra: &str) -> Check {
        let config = Config::parse(&format!(
            "hostname = \"{hostname}\"\nspool = \"/nonexistent\"\n\
             [delivery]\nport = 2525\nnameservers = [\"{nameserver}\"]\n{extra}"
        ))
        .unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let resolver = runtime.block_on(async { Resolver::new(&config) }).unwrap();
        Check { runtime, resolver }
    }

    fn route(&self, domain: &str, route: &[&str]) -> Result<Route, ResolveError> {
        let route: Vec<String> = route.iter().map(|s| s.to_string()).collect();
        self.runtime
            .block_on(self.resolver.next_hops(domain, &route))
    }

    /// The hops of `domain` as (name, preference), failing the test on anything else.
    fn hops(&self, domain: &str) -> Vec<(String, u16)> {
        match self.route(domain, &[]) {
            Ok(Route::Hops(hops)) => hops
                .iter()
                .map(|h| (h.name.clone(), h.preference))
                .collect(),
            other => panic!("{domain}: expected hops, got {other:?}"),
        }
    }

    fn addrs(&self, domain: &str) -> Vec<Vec<IpAddr>> {
        match self.route(domain, &[]) {
            Ok(Route::Hops(hops)) => hops.into_iter().map(|h| h.addrs).collect(),
            other => panic!("{domain}: expected hops, got {other:?}"),
        }
    }
}

fn ips(list: &[&str]) -> Vec<IpAddr> {
    list.iter().map(|a| a.parse().unwrap()).collect()
}

fn pairs(list: &[(&str, u16)]) -> Vec<(String, u16)> {
    list.iter().map(|(n, p)| (n.to_string(), *p)).collect()
}

#[test]
fn dns_mx_hosts_come_in_preference_order_with_every_address() {
    let dns = seed_dns();
    // This server is not smtp.example.net here, so the whole list remains.
    let c = Check::new(dns.addr, "");
    let other = Check::as_host(dns.addr, "elsewhere.test", "");
    assert_eq!(
        other.hops("example.com.br"),
        pairs(&[("terra.example.com.br", 0), ("smtp.example.net", 5)])
    );
    let addrs = other.addrs("Example.COM.br.");
    assert_eq!(addrs[0], ips(&["127.0.1.2", "127.0.1.12", "2001:db8::2"]));
    assert_eq!(addrs[1], ips(&["127.0.2.3"]));
    match other.route("example.com.br", &[]).unwrap() {
        Route::Hops(h) => assert!(h.iter().all(|h| h.port == 2525)),
        r => panic!("{r:?}"),
    }
    // An MX target that is an alias still gets the addresses it points at.
    assert_eq!(
        c.addrs("cname.example.com.br")[0][0],
        ips(&["127.0.1.2"])[0]
    );
}

#[test]
fn dns_equal_preferences_are_tried_in_random_order() {
    let dns = seed_dns();
    let c = Check::new(dns.addr, "");
    let (mut ab, mut ba) = (false, false);
    for _ in 0..200 {
        let hops = c.hops("equal.example.com.br");
        let names: Vec<&str> = hops.iter().map(|h| h.0.as_str()).collect();
        match names[..] {
            ["mx-a.example.com.br", "mx-b.example.com.br"] => ab = true,
            ["mx-b.example.com.br", "mx-a.example.com.br"] => ba = true,
            _ => panic!("unexpected hops {hops:?}"),
        }
        if ab && ba {
            return;
        }
    }
    panic!("200 lookups never gave both orders (a-b: {ab}, b-a: {ba})");
}

#[test]
fn dns_this_server_drops_itself_and_everything_less_preferred() {
    let dns = seed_dns();
    let c = Check::new(dns.addr, "[smtp]\nlisten = [\"127.0.3.25:2525\"]\n");
    // The seed's set-up: we are the backup at 5, so only the primary remains.
    assert_eq!(
        c.hops("example.com.br"),
        pairs(&[("terra.example.com.br", 0)])
    );
    // In the middle: the less preferred host goes too.
    assert_eq!(
        c.hops("middle.example.com.br"),
        pairs(&[("terra.example.com.br", 0)])
    );
    // Behind two equal hosts: both remain.
    assert_eq!(c.hops("equal.example.com.br").len(), 2);
    // Known by an interface address (127.0.0.1 on lo) or a listen address.
    assert_eq!(
        c.hops("byaddr.example.com.br"),
        pairs(&[("terra.example.com.br", 0)])
    );
    assert_eq!(
        c.hops("bylisten.example.com.br"),
        pairs(&[("terra.example.com.br", 0)])
    );
}

#[test]
fn dns_this_server_as_the_best_mx_keeps_the_mail() {
    let dns = seed_dns();
    let c = Check::new(dns.addr, "");
    assert_eq!(
        c.route("inverted.example.com.br", &[]),
        Ok(Route::SelfOnly { preference: 0 })
    );
    assert_eq!(
        c.route("only.example.com.br", &[]),
        Ok(Route::SelfOnly { preference: 10 })
    );
    // An equal-preference peer would hand the mail back: it goes too.
    assert_eq!(
        c.route("tied.example.com.br", &[]),
        Ok(Route::SelfOnly { preference: 10 })
    );
}

#[test]
fn dns_no_mx_means_the_domains_own_address() {
    let dns = seed_dns();
    let c = Check::new(dns.addr, "");
    assert_eq!(
        c.hops("plain.example.com.br"),
        pairs(&[("plain.example.com.br", 0)])
    );
    assert_eq!(c.addrs("plain.example.com.br"), [ips(&["127.0.4.1"])]);
    assert!(matches!(
        c.route("textonly.example.com.br", &[]),
        Err(ResolveError::NoSuchDomain(_))
    ));
}

#[test]
fn dns_null_mx_and_nxdomain_are_permanent() {
    let dns = seed_dns();
    let c = Check::new(dns.addr, "");
    assert_eq!(c.route("nullmx.example.com.br", &[]), Ok(Route::NullMx));
    match c.route("no-such-host.example.com.br", &[]) {
        Err(ResolveError::NoSuchDomain(m)) => assert!(m.contains("NXDOMAIN"), "{m}"),
        other => panic!("expected NoSuchDomain, got {other:?}"),
    }
}

#[test]
fn dns_hosts_without_addresses_are_skipped_and_failures_defer() {
    let dns = seed_dns();
    let c = Check::new(dns.addr, "");
    assert_eq!(
        c.hops("dangling.example.com.br"),
        pairs(&[("terra.example.com.br", 10)])
    );
    assert!(matches!(
        c.route("allgone.example.com.br", &[]),
        Err(ResolveError::Temporary(_))
    ));
    // A zone the server does not serve: REFUSED, temporary.
    assert!(matches!(
        c.route("example.org", &[]),
        Err(ResolveError::Temporary(_))
    ));
    // No nameserver at all answering: temporary, and soon.
    let dead = {
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        s.local_addr().unwrap()
    };
    let c = Check::new(dead, "");
    let start = Instant::now();
    assert!(matches!(
        c.route("example.com.br", &[]),
        Err(ResolveError::Temporary(_))
    ));
    assert!(
        start.elapsed() < Duration::from_secs(15),
        "{:?}",
        start.elapsed()
    );
}

#[test]
fn dns_a_partner_route_bypasses_the_mx_lookup() {
    let dns = seed_dns();
    let c = Check::new(dns.addr, "");
    // A null MX domain with a route: the route wins; names resolve to A/AAAA, literals are used
    // as they are, each with its own port.
    match c.route(
        "nullmx.example.com.br",
        &["mx-b.example.com.br:26", "[127.0.9.9]:2626"],
    ) {
        Ok(Route::Hops(h)) => {
            let got: Vec<_> = h
                .iter()
                .map(|h| (h.name.as_str(), h.preference, h.addrs.clone(), h.port))
                .collect();
            assert_eq!(
                got,
                [
                    ("mx-b.example.com.br", 0, ips(&["127.0.2.2"]), 26),
                    ("127.0.9.9", 1, ips(&["127.0.9.9"]), 2626)
                ]
            );
        }
        other => panic!("expected hops, got {other:?}"),
    }
    // With no DNS at all, an address literal route still works.
    let dead = {
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        s.local_addr().unwrap()
    };
    let c = Check::new(dead, "");
    match c.route("example.com.br", &["[127.0.9.9]:25"]) {
        Ok(Route::Hops(h)) => assert_eq!(h[0].addrs, ips(&["127.0.9.9"])),
        other => panic!("expected hops, got {other:?}"),
    }
}
