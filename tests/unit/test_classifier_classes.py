"""Four classes of remote replies the built-in rules must read right, in many programs' words.

Each table is written from published reply texts (MTA sources, providers' postmaster
pages, real DSNs) rather than from the rules, and holds look-alikes that must stay out
of the class. The replies are given as the sender receives them: the reply code first,
continuation lines with their ``550-`` prefixes, joined with ``\\n``.

1. DNS failures: a name that does not exist, or a domain without any mail host, makes
   the address undeliverable (recipient_unknown); a lookup that got no answer
   (SERVFAIL, timeout, "try again", EAI_AGAIN) is a temporary ``dns`` failure and defers
   even inside a 5xx. A 4xx never rejects.
2. TLS: the server's stated requirement for encryption (530 / 538, "must issue a
   STARTTLS command first") follows the code; a failed TLS negotiation (handshake,
   certificate, protocol version, cipher, MTA-STS / DANE) always defers.
3. The sending IP listed or blocked by a provider or a DNSBL: ``blacklist``.
4. Rate limits against IP listings: a pace, volume or concurrency limit is
   ``rate_limited`` (defer); a refusal whose reason is the IP's listing, reputation,
   complaints or spam from it is ``blacklisted``, even when worded as a temporary
   deferral or a rate limit.
"""

from __future__ import annotations

import re

import pytest

from zmta_bounce.classifier import Classifier, Verdict, load_rules

CLASSIFIER = Classifier(load_rules())

Case = tuple[str, str, str]


def classify(reply: str) -> Verdict:
    """As the sender asks: the reply code, and the text after it."""
    match = re.match(r"(\d{3})[ -]?(.*)", reply, re.DOTALL)
    assert match, reply
    return CLASSIFIER.classify(int(match.group(1)), match.group(2))


def ids(cases: list[Case]) -> list[str]:
    """Readable test ids: the position and the start of the reply's first line."""
    return [f"{i:02d}-{reply.splitlines()[0][:60]}" for i, (reply, _, _) in enumerate(cases)]


def check(reply: str, action: str, category: str) -> None:
    verdict = classify(reply)
    assert (verdict.action, verdict.category) == (action, category), f"{reply!r} -> {verdict.message}"


# -------------------------------------------------------------------------------------
# 1. DNS failures
# -------------------------------------------------------------------------------------
DNS: list[Case] = [
    # Postfix (dns_lookup.c): HOST_NOT_FOUND is permanent, TRY_AGAIN adds ", try again".
    (
        "550 5.4.4 <ann@example.invalid>: Host or domain name not found. Name service error for"
        " name=example.invalid type=MX: Host not found",
        "reject",
        "recipient_unknown",
    ),
    (
        "451 4.4.3 <ann@example.com>: Host or domain name not found. Name service error for"
        " name=example.com type=MX: Host not found, try again",
        "defer",
        "dns",
    ),
    (
        "554 5.4.4 <ann@example.com>: Host or domain name not found. Name service error for"
        " name=mx1.example.com type=A: Host not found, try again",
        "defer",
        "dns",
    ),
    (
        "550 5.4.4 <bob@example.net>: Host or domain name not found. Name service error for"
        " name=example.net type=A: Host found but no data record of requested type",
        "reject",
        "recipient_unknown",
    ),
    # Node (c-ares / getaddrinfo error codes) as relayed by nodemailer, ZoneMTA, Haraka.
    ("550 5.1.2 Failed to deliver: getaddrinfo ENOTFOUND example.invalid", "reject", "recipient_unknown"),
    (
        "550 DNS error when resolving MX for example.invalid: queryMx ENOTFOUND example.invalid",
        "reject",
        "recipient_unknown",
    ),
    ("450 DNS error when resolving MX for example.com: DNS server returned general failure", "defer", "dns"),
    ("550 5.4.4 queryMx ESERVFAIL example.com", "defer", "dns"),
    ("554 5.4.4 DNS error when resolving MX for example.com: queryMx ETIMEOUT example.com", "defer", "dns"),
    ("550 getaddrinfo EAI_AGAIN mx.example.com", "defer", "dns"),
    (
        "550 DNS error when resolving MX for example.com: Timeout while contacting DNS servers",
        "defer",
        "dns",
    ),
    (
        "550 5.4.4 DNS error when resolving MX for example.org: DNS server returned answer with no data",
        "reject",
        "recipient_unknown",
    ),
    # Gmail's DNS errors, as a relay passes them on.
    (
        "550-5.1.2 The domain example.invalid couldn't be found. Check for typos or\n"
        "550-5.1.2 unnecessary spaces and try again.\n"
        "550 5.1.2 DNS Error: DNS type 'mx' lookup of example.invalid responded with code NXDOMAIN"
        " Domain name not found: example.invalid",
        "reject",
        "recipient_unknown",
    ),
    ("451 4.4.3 DNS Error: DNS type 'mx' lookup of example.com responded with code SERVFAIL", "defer", "dns"),
    ("550 5.4.4 DNS Error: DNS type 'mx' lookup of example.com responded with code SERVFAIL", "defer", "dns"),
    # Exim, Haraka, sendmail, Exchange, glibc.
    ("550 5.4.4 all relevant MX records point to non-existent hosts", "reject", "recipient_unknown"),
    ("451 4.4.3 host lookup did not complete", "defer", "dns"),
    ("550 No MX or A records for example.net", "reject", "recipient_unknown"),
    ("550 5.1.2 Domain example.com has no valid MX", "reject", "recipient_unknown"),
    ("550 5.1.2 Nowhere to deliver mail to for domain: example.net", "reject", "recipient_unknown"),
    ("550 5.1.2 No Such Domain: example.invalid", "reject", "recipient_unknown"),
    ("451 4.4.3 Temporary MX lookup error for example.com", "defer", "dns"),
    (
        "550 5.1.2 <ann@example.invalid>... Host unknown (Name server: example.invalid: host not found)",
        "reject",
        "recipient_unknown",
    ),
    ("451 4.4.3 Name server: example.com.: host name lookup failure", "defer", "dns"),
    (
        "550 5.4.310 DNS domain example.invalid does not exist [Message=InfoDomainNonexistent]"
        " [LastAttemptedServerName=example.invalid] [AM6PR02MB1234.eurprd02.prod.outlook.com]",
        "reject",
        "recipient_unknown",
    ),
    (
        "451 4.4.0 DNS query failed. The error was: SMTPSEND.DNS.NonExistentDomain; nonexistent domain",
        "defer",
        "recipient_unknown",
    ),
    ("554 5.4.4 SMTPSEND.DNS.NonExistentDomain; nonexistent domain", "reject", "recipient_unknown"),
    ("554 5.4.4 Temporary failure in name resolution", "defer", "dns"),
    # Null MX (RFC 7505) in the words of the RFC, Postfix and Haraka.
    ("556 5.1.10 Recipient address has null MX", "reject", "recipient_unknown"),
    ("554 5.1.10 Domain example.org does not accept mail (nullMX)", "reject", "recipient_unknown"),
    ("550 5.1.2 Domain example.org sends and receives no email (NULL MX)", "reject", "recipient_unknown"),
    ("550 an MX or SRV record indicated no SMTP service", "reject", "recipient_unknown"),
    # Look-alikes that are not about the recipient's DNS.
    (
        "550 5.1.1 <ann@example.com>: Recipient address rejected: User unknown in virtual mailbox table",
        "reject",
        "recipient_unknown",
    ),
    ("450 4.1.8 <bounce@mailer.example>: Sender address rejected: Domain not found", "defer", "sender"),
    ("550 5.1.8 <bounce@mailer.example>: Sender address rejected: Domain not found", "reject", "sender"),
    ("451 4.1.8 Domain of sender address ann@slowdns.example does not resolve", "defer", "sender"),
    ("550 5.7.27 Sender address has null MX", "reject", "sender"),
    ("553 5.1.8 Sender domain example.net has no MX record", "reject", "sender"),
    ("450 4.7.1 <localhost.localdomain>: Helo command rejected: Host not found", "defer", "policy"),
    ("450 4.7.25 Client host rejected: cannot find your hostname, [192.0.2.10]", "defer", "policy"),
    ("451 4.3.0 <ann@example.com>: Temporary lookup failure", "defer", "capacity"),
    ("421 4.4.2 mx.example.com Error: timeout exceeded", "defer", "network"),
    ("554 5.4.4 SMTPSEND.DNS.MxLoopback; DNS records for this domain are configured in a loop", "reject", "network"),
]


@pytest.mark.parametrize(("reply", "action", "category"), DNS, ids=ids(DNS))
def test_dns_failures(reply: str, action: str, category: str) -> None:
    check(reply, action, category)


# -------------------------------------------------------------------------------------
# 2. TLS
# -------------------------------------------------------------------------------------
TLS: list[Case] = [
    # The server's requirement (RFC 3207 530, RFC 4954 538): the code decides.
    ("530 5.7.0 Must issue a STARTTLS command first", "reject", "tls"),
    ("530 Must issue a STARTTLS command first", "reject", "tls"),
    (
        "530-5.7.0 Must issue a STARTTLS command first. For more information, go to\n"
        "530 5.7.0 https://support.example.com/tls 3f1a2b - gsmtp",
        "reject",
        "tls",
    ),
    ("451 5.7.3 STARTTLS is required to send mail [DM6PR11MB1234.namprd11.prod.outlook.com]", "defer", "tls"),
    ("550 5.7.3 STARTTLS is required to send mail [DM6PR11MB1234.namprd11.prod.outlook.com]", "reject", "tls"),
    ("538 5.7.11 Encryption required for requested authentication mechanism", "reject", "tls"),
    ("553 This route requires encryption (TLS)", "reject", "tls"),
    ("421 4.7.0 TLS required for RCPT domain, closing connection.", "defer", "tls"),
    # The negotiation failed: any code defers.
    ("454 4.7.0 TLS not available due to local problem", "defer", "tls"),
    ("403 4.7.0 TLS handshake failed.", "defer", "tls"),
    (
        "550 5.7.0 Delivery failed: TLS handshake failed: [SSL: WRONG_VERSION_NUMBER] wrong version number"
        " (_ssl.c:1000)",
        "defer",
        "tls",
    ),
    (
        "554 5.0.0 Error: 40E7B0C2C67F0000:error:0A000086:SSL routines:tls_post_process_server_certificate:"
        "certificate verify failed",
        "defer",
        "tls",
    ),
    ("451 4.7.5 Server certificate not verified", "defer", "tls"),
    ("550 5.7.5 TLS is required, but was not offered by host mx.example.com[192.0.2.25]", "defer", "tls"),
    ("554 5.7.10 TLS required but not available", "defer", "tls"),
    ("450 4.7.0 a TLS session is required, but an attempt to start TLS failed", "defer", "tls"),
    (
        "451 4.7.5 MTA-STS policy validation failed for mx.example.com: certificate name mismatch",
        "defer",
        "tls",
    ),
    ("550 5.7.5 The recipient domain's MTA-STS policy could not be satisfied", "defer", "tls"),
    ("550 5.7.1 unable to get local issuer certificate", "defer", "tls"),
    ("554 5.7.0 Hostname mismatch, certificate is not valid for 'mx.example.com'", "defer", "tls"),
    (
        "550-5.7.0 TLS negotiation failed:\n"
        "550 5.7.0 error:1408A0C1:SSL routines:ssl3_get_client_hello:no shared cipher",
        "defer",
        "tls",
    ),
    ("550 5.7.1 SSL_connect error: sslv3 alert handshake failure", "defer", "tls"),
    ("554 5.7.0 certificate has expired", "defer", "tls"),
    ("451 4.7.5 Server certificate not trusted", "defer", "tls"),
    ("451 4.7.5 TLS is required, but our TLS engine is unavailable", "defer", "tls"),
    (
        "554 Error: Hostname/IP does not match certificate's altnames: Host: mx.example.com. is not in the"
        " cert's altnames: DNS:*.example.net",
        "defer",
        "tls",
    ),
    ("421 4.4.0 TLS negotiation failed with error UnknownCredentials", "defer", "tls"),
    # Look-alikes: authentication, blocks, recipients, content.
    ("535 5.7.8 Authentication credentials invalid", "reject", "policy"),
    ("530 5.7.0 Must issue an AUTH command first", "reject", "policy"),
    ("530 5.7.1 Authentication required", "reject", "policy"),
    ("550 5.1.1 <ann@ssl-example.com>: Recipient address rejected: User unknown", "reject", "recipient_unknown"),
    ("554 5.7.1 Message rejected: gift certificate scam detected", "reject", "spam"),
    (
        "554 5.7.1 Service unavailable; Client host [192.0.2.1] blocked using zen.spamhaus.org",
        "blacklist",
        "blacklisted",
    ),
]


@pytest.mark.parametrize(("reply", "action", "category"), TLS, ids=ids(TLS))
def test_tls_failures(reply: str, action: str, category: str) -> None:
    check(reply, action, category)


# -------------------------------------------------------------------------------------
# 3. The sending IP blocked or listed
# -------------------------------------------------------------------------------------
BLACKLISTED: list[Case] = [
    (
        "550 5.7.1 Service unavailable, Client host [192.0.2.11] blocked using Customer Block list"
        " (AS16012607). To request removal from this list please forward this message to"
        " delist@messaging.microsoft.com",
        "blacklist",
        "blacklisted",
    ),
    (
        "554 5.7.1 Service unavailable; Client host [192.0.2.12] blocked using Spamhaus. To request removal"
        " from this list see https://www.spamhaus.org/query/ip/192.0.2.12 (AS3130)."
        " [BN1NAM02FT019.eop-nam02.prod.protection.outlook.com]",
        "blacklist",
        "blacklisted",
    ),
    (
        "550 5.7.606 Access denied, banned sending IP [192.0.2.13]. To request removal from this list please"
        " visit https://sender.office.com/ and follow the directions.",
        "blacklist",
        "blacklisted",
    ),
    # Despite "sender", Microsoft documents 5.7.511 as the IP on its banned list.
    (
        "550 5.7.511 Access denied, banned sender[192.0.2.14]. To request removal from this list, forward"
        " this message to delist@microsoft.com.",
        "blacklist",
        "blacklisted",
    ),
    (
        "553 5.7.1 [BL21] Connections will not be accepted from 192.0.2.15, because the ip is in Spamhaus's"
        " list; see https://postmaster.yahooinc.com/error-codes",
        "blacklist",
        "blacklisted",
    ),
    (
        "553 Mail from 192.0.2.16 not allowed - 5.7.1 [BL23] Connections not accepted from IP addresses on"
        " Spamhaus XBL; see http://postmaster.yahoo.com/errors/550-bl23.html [550]",
        "blacklist",
        "blacklisted",
    ),
    ("554 mx.example.com ESMTP not accepting connections", "blacklist", "blacklisted"),
    ("554 5.7.1 mx.example.com is not accepting connections from 192.0.2.17", "blacklist", "blacklisted"),
    (
        "554-mx.example.com Your access to this mail system has been rejected due to the sending MTA's poor\n"
        "554 reputation. If you believe that this failure is in error, please contact the intended recipient.",
        "blacklist",
        "blacklisted",
    ),
    ("554 RTR:BL http://postmaster.info.aol.com/errors/554rtrbl.html", "blacklist", "blacklisted"),
    (
        "554 resimta-h1p-028596.sys.comcast.net resimta-h1p-028596.sys.comcast.net 192.0.2.18 found on one"
        " or more RBLs, see http://postmaster.comcast.net/smtp-error-codes.php#BL000001",
        "blacklist",
        "blacklisted",
    ),
    ("550 5.7.1 Your IP address has been blocked", "blacklist", "blacklisted"),
    ("554 5.7.1 Connection from 192.0.2.19 blocked by local policy at greeting", "blacklist", "blacklisted"),
    ("550 5.7.1 IP 192.0.2.20 is blacklisted", "blacklist", "blacklisted"),
    ("554 Your IP 192.0.2.21 is blocklisted", "blacklist", "blacklisted"),
    ("550 IP address 192.0.2.22 is denylisted", "blacklist", "blacklisted"),
    ("554 Blocked - see https://ipcheck.proofpoint.com/?ip=192.0.2.23", "blacklist", "blacklisted"),
    (
        "554 Service unavailable; Client host [192.0.2.24] blocked using Barracuda Reputation;"
        " http://www.barracudanetworks.com/reputation/?r=1&ip=192.0.2.24",
        "blacklist",
        "blacklisted",
    ),
    (
        "554 5.7.1 Message rejected: Poor Reputation Sender - CSI:192.0.2.25 -"
        " https://csi.cloudmark.com/reset-request/?ip=192.0.2.25",
        "blacklist",
        "blacklisted",
    ),
    (
        "554 5.7.1 Connection from 192.0.2.27 rejected by ers.trendmicro.com, see"
        " https://ers.trendmicro.com/reputations",
        "blacklist",
        "blacklisted",
    ),
    ("550 Access denied - IP reputation", "blacklist", "blacklisted"),
    (
        "550 5.7.1 Service unavailable; client [192.0.2.28] blocked using Trend Micro Email Reputation database",
        "blacklist",
        "blacklisted",
    ),
    ("550 5.7.1 mx.example.com is not currently accepting mail from your IP", "blacklist", "blacklisted"),
    ("554 5.7.1 You are not allowed to connect.", "blacklist", "blacklisted"),
    ("550 5.7.0 Blocked - see https://support.apple.com/en-us/HT204137", "blacklist", "blacklisted"),
    ("554 5.7.1 Your IP 192.0.2.31 is not allowed to send mail to us", "blacklist", "blacklisted"),
    ("450 4.7.1 Client host rejected: 192.0.2.29 is listed on zen.spamhaus.org", "blacklist", "blacklisted"),
    (
        "421 4.7.0 Your IP 192.0.2.30 has been temporarily blocked due to spam complaints",
        "blacklist",
        "blacklisted",
    ),
    (
        "550 5.7.1 Mail from IP 192.0.2.34 was rejected due to listing in Spamhaus XBL. For details please see"
        " http://www.spamhaus.org/query/bl?ip=192.0.2.34",
        "blacklist",
        "blacklisted",
    ),
    # Look-alikes: reverse DNS, the sender's address or domain, the message, the recipient.
    ("450 4.7.1 Client host rejected: cannot find your hostname, [192.0.2.40]", "defer", "policy"),
    ("550 5.7.1 Client host rejected: cannot find your reverse hostname, [192.0.2.41]", "reject", "policy"),
    (
        "554 5.7.1 Service unavailable; Sender address [bob@spam.example] blocked using dbl.spamhaus.org;"
        " https://www.spamhaus.org/query/domain/spam.example",
        "reject",
        "spam",
    ),
    ("554 5.7.1 <bob@example.com>: Sender address rejected: Access denied", "reject", "sender"),
    ("553 5.7.1 <bob@example.com>: Sender address is blacklisted", "reject", "sender"),
    ("550 5.7.1 Message rejected as spam by Content Filtering.", "reject", "spam"),
    ("550 5.7.1 Your message was blocked because it contained a blacklisted URL", "reject", "spam"),
    ("554 5.7.1 Message blocked by local policy", "reject", "policy"),
    (
        "550 5.1.1 <ann@example.com>: Recipient address rejected: User unknown in local recipient table",
        "reject",
        "recipient_unknown",
    ),
    (
        "550 5.7.26 Unauthenticated email from example.com is not accepted due to domain's DMARC policy",
        "reject",
        "policy",
    ),
]


@pytest.mark.parametrize(("reply", "action", "category"), BLACKLISTED, ids=ids(BLACKLISTED))
def test_sending_ip_blocked(reply: str, action: str, category: str) -> None:
    check(reply, action, category)


# -------------------------------------------------------------------------------------
# 4. Rate limits against IP listings
# -------------------------------------------------------------------------------------
RATE: list[Case] = [
    # A pace, volume or concurrency limit: rate_limited, deferred whatever the code.
    (
        "450-4.2.1 The user you are trying to contact is receiving mail at a rate that\n"
        "450-4.2.1 prevents additional messages from being delivered. Please resend your\n"
        "450-4.2.1 message at a later time. If the user is able to receive mail at that\n"
        "450 4.2.1 time, your message will be delivered. 5a1b2c3d4e - gsmtp",
        "defer",
        "rate_limited",
    ),
    ("421 4.7.0 mx.example.com Error: too many connections from 192.0.2.50", "defer", "rate_limited"),
    (
        "421 4.7.0 Too many connections from your IP address (192.0.2.51), blocked for 5 minutes",
        "defer",
        "rate_limited",
    ),
    ("421 4.7.0 Too many connections from your IP, temporarily blocked", "defer", "rate_limited"),
    ("452 4.5.3 Too many recipients", "defer", "rate_limited"),
    ("421 4.7.0 Too many messages in this connection", "defer", "rate_limited"),
    ("451 4.7.1 Throttled - please try again later", "defer", "rate_limited"),
    ("421 4.7.0 [192.0.2.52] Throttled: you are sending too fast", "defer", "rate_limited"),
    ("554 5.7.1 You have exceeded the rate limit", "defer", "rate_limited"),
    (
        "550-5.4.5 Daily user sending limit exceeded. For more information on Gmail\n"
        "550-5.4.5 sending limits go to\n"
        "550 5.4.5  https://support.google.com/a/answer/166852 d2e1a72fcca58 - gsmtp",
        "defer",
        "rate_limited",
    ),
    ("454 Throttling failure: Maximum sending rate exceeded.", "defer", "rate_limited"),
    ("550 5.7.1 Sending rate exceeded for 192.0.2.53, try again in 60 seconds", "defer", "rate_limited"),
    ("550 5.7.1 Your IP address 192.0.2.54 has been rate limited", "defer", "rate_limited"),
    (
        "421 RP-001 (BAY004-MC1F41) Unfortunately, some messages from 192.0.2.55 weren't sent. Please try"
        " again. We have limits for how many messages can be sent per hour and per day.",
        "defer",
        "rate_limited",
    ),
    (
        "421 resimta-po-21v.sys.comcast.net 192.0.2.56 rate limit exceeded, see"
        " http://postmaster.comcast.net/smtp-error-codes.php#RL000001",
        "defer",
        "rate_limited",
    ),
    ("421 4.7.1 : (DYN:T1) http://postmaster.info.aol.com/errors/421dynt1.html", "defer", "rate_limited"),
    (
        "421 4.3.2 The maximum number of concurrent server connections has exceeded a limit, closing"
        " transmission channel",
        "defer",
        "rate_limited",
    ),
    ("450 4.7.1 Error: too much mail from 192.0.2.57", "defer", "rate_limited"),
    (
        "421 4.7.0 Too many concurrent SMTP connections from this IP address; please try again later.",
        "defer",
        "rate_limited",
    ),
    ("550 5.7.1 Daily sending quota exceeded", "defer", "rate_limited"),
    # The reason is the IP's listing, reputation or complaints: blacklisted.
    (
        "421-4.7.28 [192.0.2.58      15] Our system has detected an unusual rate of\n"
        "421-4.7.28 unsolicited mail originating from your IP address. To protect our\n"
        "421-4.7.28 users from spam, mail sent from your IP address has been temporarily\n"
        "421-4.7.28 rate limited. Please visit\n"
        "421-4.7.28  https://support.google.com/mail/?p=UnsolicitedRateLimitError to\n"
        "421 4.7.28 review our Bulk Email Senders Guidelines. 98e67ed59e1d1 - gsmtp",
        "blacklist",
        "blacklisted",
    ),
    (
        "421-4.7.0 [192.0.2.59      15] Our system has detected an unusual rate of\n"
        "421-4.7.0 unsolicited mail originating from your IP address. To protect our\n"
        "421 4.7.0 users from spam, mail sent from your IP address has been temporarily blocked.",
        "blacklist",
        "blacklisted",
    ),
    (
        "451 4.7.650 The mail server [192.0.2.60] has been temporarily rate limited due to IP reputation."
        " For e-mail delivery information, see https://aka.ms/postmaster (S775)",
        "blacklist",
        "blacklisted",
    ),
    (
        "421 4.7.0 [TSS04] Messages from 192.0.2.61 temporarily deferred due to unexpected volume or user"
        " complaints - 4.16.55.1; see https://postmaster.yahooinc.com/error-codes",
        "blacklist",
        "blacklisted",
    ),
    (
        "421 4.7.1 [TS03] All messages from 192.0.2.62 will be permanently deferred; Retrying will NOT succeed.",
        "blacklist",
        "blacklisted",
    ),
    ("550 5.7.1 Your IP address 192.0.2.63 is listed on bl.spamcop.net", "blacklist", "blacklisted"),
    (
        "421 4.7.0 Too many connections from your IP; 192.0.2.68 is listed on zen.spamhaus.org",
        "blacklist",
        "blacklisted",
    ),
    (
        "421 4.7.1 Your IP 192.0.2.64 has a poor reputation; messages from it are throttled",
        "blacklist",
        "blacklisted",
    ),
    (
        "421 Too many spams from your IP (192.0.2.65), please visit http://postmaster.free.fr/",
        "blacklist",
        "blacklisted",
    ),
    ("451 IP temporarily blacklisted - https://community.mimecast.com/docs/DOC-1369#451", "blacklist", "blacklisted"),
    # Neither: the sender's domain reputation (spam) and a busy server (capacity).
    (
        "421-4.7.28 [192.0.2.66      15] Our system has detected an unusual rate of\n"
        "421-4.7.28 unsolicited mail originating from your DKIM domain [example.com      12]. To\n"
        "421 4.7.28 protect our users from spam, mail sent from your domain has been temporarily rate limited.",
        "defer",
        "spam",
    ),
    (
        "451 4.7.500 Server busy. Please try again later from [192.0.2.67]. (S77714)"
        " [AM0PR04MB6371.eurprd04.prod.outlook.com]",
        "defer",
        "capacity",
    ),
]


@pytest.mark.parametrize(("reply", "action", "category"), RATE, ids=ids(RATE))
def test_rate_limits_and_ip_listings(reply: str, action: str, category: str) -> None:
    check(reply, action, category)


def test_no_temporary_reply_is_rejected() -> None:
    """The policy the tables rely on: a 4xx (or 4.x.x) reply is never bounced."""
    for reply, _, _ in DNS + TLS + BLACKLISTED + RATE:
        if reply[0] == "4":
            assert classify(reply).action != "reject", reply
