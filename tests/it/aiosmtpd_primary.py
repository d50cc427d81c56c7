#!/usr/bin/env python3
"""A scriptable primary MX for the integration tests (peers.rs), built on aiosmtpd.

Listens on --listen IP:PORT and writes every accepted message to --out DIR as
`msg-NNNNNN.eml` (written to a dot file, then renamed): one JSON line with the envelope
({"session", "mail_from", "rcpt_tos", "mail_options", "rcpt_options"}), a newline, then the
message bytes exactly as received (CRLF lines, dot-unstuffed, without the final dot line).

Per-session limits, each replied exactly as listed:
  --max-messages-per-session N   the MAIL after N accepted messages in one session gets
      --cap-action 421    "421 4.7.0 Error: too many messages in this session", then close
      --cap-action 452    "452 4.5.3 Error: too many messages in this session" (session stays)
      --cap-action close  no reply: the TCP connection is closed
  --max-rcpt N                   recipients past N in one transaction get
                                 "452 4.5.3 Error: too many recipients"
  --data-421-after N             the end of DATA of message N+1 in a session gets
                                 "421 4.3.2 Error: too many messages in this session", the
                                 message is not stored, and the connection is closed
  --greeting-delay SECS          wait before the 220 greeting
  --no-greeting                  accept the TCP connection and never greet (reads and
                                 discards whatever the client sends until it closes)
  --users FILE                   the known recipients (local parts or addresses, one a
                                 line, case-insensitive); any other RCPT gets "550 5.1.1
                                 <ADDR>: Recipient address rejected: User unknown in local
                                 recipient table"

Other replies are aiosmtpd's own, except MAIL/RCPT "250 2.1.0 Ok" / "250 2.1.5 Ok" and the
end of DATA "250 2.0.0 Ok: queued as NNNNNN" (the file's number). Data lines longer than
1001 bytes (CRLF included) get aiosmtpd's "500 Line too long (see RFC5321 4.5.3.1.6)".

Log lines on stderr (flushed): "session K connect IP:PORT", "session K < REPLY" for every
reply, "session K stored msg-NNNNNN.eml", "session K closed", and once "listening IP:PORT"
when the socket is bound.
"""

import argparse
import asyncio
import json
import os
import sys

from aiosmtpd.smtp import SMTP

ARGS = None
USERS = None
SESSIONS = 0
STORED = 0


def log(line):
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


class Handler:
    async def handle_MAIL(self, server, session, envelope, address, mail_options):
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        envelope.rcpt_options_list = []
        return "250 2.1.0 Ok"

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if USERS is not None:
            a = address.lower()
            if a not in USERS and a.rsplit("@", 1)[0] not in USERS:
                return (
                    "550 5.1.1 <%s>: Recipient address rejected: "
                    "User unknown in local recipient table" % address
                )
        if ARGS.max_rcpt is not None and len(envelope.rcpt_tos) >= ARGS.max_rcpt:
            return "452 4.5.3 Error: too many recipients"
        envelope.rcpt_tos.append(address)
        getattr(envelope, "rcpt_options_list", []).append(rcpt_options)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server, session, envelope):
        global STORED
        if ARGS.data_421_after is not None and session.accepted >= ARGS.data_421_after:
            server.close_after_reply = True
            return "421 4.3.2 Error: too many messages in this session"
        STORED += 1
        name = "msg-%06d.eml" % STORED
        head = {
            "session": session.number,
            "mail_from": envelope.mail_from,
            "rcpt_tos": list(envelope.rcpt_tos),
            "mail_options": list(envelope.mail_options),
            "rcpt_options": getattr(envelope, "rcpt_options_list", []),
        }
        tmp = os.path.join(ARGS.out, "." + name)
        with open(tmp, "wb") as f:
            f.write(json.dumps(head).encode() + b"\n")
            f.write(envelope.original_content)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, os.path.join(ARGS.out, name))
        session.accepted += 1
        log("session %d stored %s" % (session.number, name))
        return "250 2.0.0 Ok: queued as %06d" % STORED


class PrimarySMTP(SMTP):
    close_after_reply = False

    def _create_session(self):
        global SESSIONS
        s = super()._create_session()
        SESSIONS += 1
        s.number = SESSIONS
        s.accepted = 0
        return s

    async def push(self, status):
        text = status if isinstance(status, str) else status.decode("utf-8", "replace")
        log("session %d < %s" % (self.session.number, text))
        await super().push(status)

    async def _handle_client(self):
        peer = self.session.peer
        log("session %d connect %s:%s" % (self.session.number, peer[0], peer[1]))
        try:
            if ARGS.no_greeting:
                while await self._reader.read(4096):
                    pass
                self.transport.close()
                return
            if ARGS.greeting_delay > 0:
                await asyncio.sleep(ARGS.greeting_delay)
            await super()._handle_client()
        finally:
            log("session %d closed" % self.session.number)

    async def smtp_MAIL(self, arg):
        cap = ARGS.max_messages_per_session
        if cap is not None and self.session.accepted >= cap and self.session.host_name:
            if ARGS.cap_action == "close":
                log("session %d closing without a reply" % self.session.number)
                self.transport.close()
                return
            if ARGS.cap_action == "421":
                await self.push("421 4.7.0 Error: too many messages in this session")
                self.transport.close()
                return
            await self.push("452 4.5.3 Error: too many messages in this session")
            return
        await super().smtp_MAIL(arg)

    async def smtp_DATA(self, arg):
        await super().smtp_DATA(arg)
        if self.close_after_reply:
            self.transport.close()


def main():
    global ARGS
    p = argparse.ArgumentParser(description="aiosmtpd primary for the tests")
    p.add_argument("--listen", required=True, help="IP:PORT")
    p.add_argument("--out", required=True, help="directory for the messages")
    p.add_argument("--hostname", default="aiosmtpd.test")
    p.add_argument("--max-messages-per-session", type=int)
    p.add_argument("--cap-action", choices=["close", "421", "452"], default="421")
    p.add_argument("--max-rcpt", type=int)
    p.add_argument("--data-421-after", type=int)
    p.add_argument("--greeting-delay", type=float, default=0.0)
    p.add_argument("--no-greeting", action="store_true")
    p.add_argument("--users")
    ARGS = p.parse_args()
    global USERS
    if ARGS.users is not None:
        with open(ARGS.users) as f:
            USERS = {l.strip().lower() for l in f if l.strip()}
    ip, _, port = ARGS.listen.rpartition(":")

    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)

    def factory():
        return PrimarySMTP(
            Handler(),
            hostname=ARGS.hostname,
            ident="ESMTP aiosmtpd primary",
            decode_data=False,
            enable_SMTPUTF8=True,
            loop=loop,
        )

    server = loop.run_until_complete(loop.create_server(factory, host=ip, port=int(port)))
    log("listening %s:%s" % (ip, port))
    try:
        loop.run_forever()
    finally:
        server.close()


if __name__ == "__main__":
    main()
