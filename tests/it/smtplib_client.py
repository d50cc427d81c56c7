"""Sends mail with Python's smtplib, as the test `smtplib` asks.

Usage: python3 smtplib_client.py HOST PORT < request.json

The request: {"helo": NAME, "transactions": [{"from": S, "to": [R...], "mail_options": [...],
"rcpt_options": [...], "message_hex": HEX}]}. All transactions use one connection.

Prints one JSON object: {"banner": [code, text], "ehlo": {feature: params},
"results": [{"refused": {rcpt: [code, text]}} | {"error": TEXT}]}.
"""

import json
import smtplib
import sys


def main():
    host, port = sys.argv[1], int(sys.argv[2])
    request = json.load(sys.stdin)
    out = {"results": []}
    s = smtplib.SMTP(local_hostname=request["helo"], timeout=30)
    code, banner = s.connect(host, port)
    out["banner"] = [code, banner.decode("utf-8", "replace")]
    code, _ = s.ehlo()
    if code != 250:
        raise SystemExit(f"EHLO refused: {code}")
    out["ehlo"] = dict(s.esmtp_features)
    for t in request["transactions"]:
        message = bytes.fromhex(t["message_hex"])
        try:
            refused = s.sendmail(
                t["from"],
                t["to"],
                message,
                mail_options=t.get("mail_options", []),
                rcpt_options=t.get("rcpt_options", []),
            )
            out["results"].append(
                {"refused": {r: [c, m.decode("utf-8", "replace")] for r, (c, m) in refused.items()}}
            )
        except smtplib.SMTPException as e:
            out["results"].append({"error": repr(e)})
            s.rset()
    s.quit()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
