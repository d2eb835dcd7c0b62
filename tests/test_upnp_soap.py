"""The SOAP codec: lenient where clients differ, closed against XML attacks."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from lxml import etree
from twisted.trial.unittest import SynchronousTestCase

from igdpcp.upnp import soap

V1 = "urn:schemas-upnp-org:service:WANIPConnection:1"
ENV = soap.NS_ENVELOPE


def envelope(action="GetExternalIPAddress", ns=V1, args="", env="s", u="u", decl=True, extra=""):
    head = '<?xml version="1.0"?>' if decl else ""
    return (f'{head}{extra}<{env}:Envelope xmlns:{env}="{ENV}" {env}:encodingStyle="{soap.NS_ENCODING}">'
            f'<{env}:Body><{u}:{action} xmlns:{u}="{ns}">{args}</{u}:{action}></{env}:Body>'
            f'</{env}:Envelope>').encode()


class SoapActionTests(SynchronousTestCase):
    def test_quoted(self):
        self.assertEqual(soap.parse_soap_action(f'"{V1}#AddPortMapping"'), (V1, "AddPortMapping"))

    def test_unquoted_and_bytes(self):
        self.assertEqual(soap.parse_soap_action(f"{V1}#AddPortMapping".encode()), (V1, "AddPortMapping"))

    def test_whitespace_and_lone_trailing_quote(self):
        self.assertEqual(soap.parse_soap_action(f'  {V1}#GetStatusInfo"  '), (V1, "GetStatusInfo"))

    def test_bad_headers_are_401(self):
        for header in (None, "", '""', "noaction", f"{V1}#", "#Action"):
            with self.assertRaises(soap.SoapError) as cm:
                soap.parse_soap_action(header)
            self.assertEqual(cm.exception.code, 401, header)


class ParseRequestTests(SynchronousTestCase):
    def parse(self, body, header=f'"{V1}#AddPortMapping"'):
        return soap.parse_request(body, header)

    def assertCode(self, code, body, header=f'"{V1}#AddPortMapping"'):
        with self.assertRaises(soap.SoapError) as cm:
            soap.parse_request(body, header)
        self.assertEqual(cm.exception.code, code)
        return cm.exception

    def test_arguments_in_order(self):
        body = envelope("AddPortMapping", args="<NewRemoteHost></NewRemoteHost><NewExternalPort>80</NewExternalPort>"
                                              "<NewProtocol>TCP</NewProtocol>")
        service_type, action, args = self.parse(body)
        self.assertEqual((service_type, action), (V1, "AddPortMapping"))
        self.assertEqual(list(args.items()), [("NewRemoteHost", ""), ("NewExternalPort", "80"), ("NewProtocol", "TCP")])

    def test_prefixes_do_not_matter(self):
        for env, u in (("s", "u"), ("soap", "m"), ("ns0", "ns1"), ("SOAP-ENV", "x")):
            request = self.parse(envelope("AddPortMapping", args="<NewProtocol>UDP</NewProtocol>", env=env, u=u))
            self.assertEqual(request.args, {"NewProtocol": "UDP"})

    def test_default_namespace_for_action(self):
        body = (f'<s:Envelope xmlns:s="{ENV}"><s:Body><AddPortMapping xmlns="{V1}">'
                f'<NewProtocol>TCP</NewProtocol></AddPortMapping></s:Body></s:Envelope>').encode()
        # The arguments inherit the default namespace; they are matched by local name.
        self.assertEqual(self.parse(body).args, {"NewProtocol": "TCP"})

    def test_envelope_namespace_must_be_soap(self):
        body = envelope().replace(ENV.encode(), b"http://example.com/not-soap")
        self.assertCode(402, body, f"{V1}#GetExternalIPAddress")

    def test_without_header_read_from_body(self):
        request = soap.parse_request(envelope(), None)
        self.assertEqual((request.service_type, request.action), (V1, "GetExternalIPAddress"))

    def test_header_and_body_must_agree(self):
        self.assertCode(401, envelope("GetExternalIPAddress"), f"{V1}#AddPortMapping")
        self.assertCode(401, envelope("AddPortMapping"),
                        "urn:schemas-upnp-org:service:WANIPConnection:2#AddPortMapping")

    def test_action_without_namespace(self):
        body = f'<s:Envelope xmlns:s="{ENV}"><s:Body><AddPortMapping/></s:Body></s:Envelope>'.encode()
        self.assertCode(401, body, None)

    def test_unescaped_ampersand_is_text(self):
        body = envelope("AddPortMapping", args="<NewPortMappingDescription>Tom & Jerry &copy; &amp; &#65;"
                                              "</NewPortMappingDescription>")
        self.assertEqual(self.parse(body).args["NewPortMappingDescription"], "Tom & Jerry &copy; & A")

    def test_truncated_body_recovers_what_it_can(self):
        body = envelope("AddPortMapping", args="<NewProtocol>TCP</NewProtocol>")[:-40]
        self.assertEqual(self.parse(body).args, {"NewProtocol": "TCP"})

    def test_duplicate_argument(self):
        body = envelope("AddPortMapping", args="<NewProtocol>TCP</NewProtocol><NewProtocol>UDP</NewProtocol>")
        self.assertCode(402, body)

    def test_malformed_is_402_when_the_action_is_known(self):
        for body in (b"", b"garbage", b"<a>", b"<s:Envelope", b"\x00\xff\xfe", b"<?xml version='1.0'?>"):
            self.assertCode(402, body)

    def test_malformed_is_401_when_the_action_is_not_known(self):
        for body in (b"", b"garbage", b"<a/>", f'<s:Envelope xmlns:s="{ENV}"><s:Body/></s:Envelope>'.encode()):
            self.assertCode(401, body, None)

    def test_billion_laughs_is_refused_not_expanded(self):
        dtd = ('<!DOCTYPE lolz [<!ENTITY lol "lol">'
               + "".join(f'<!ENTITY lol{i} "{("&lol" + str(i - 1) + ";") * 10 if i > 1 else "&lol;" * 10}">'
                         for i in range(1, 10)) + "]>")
        body = envelope("AddPortMapping", args="<NewPortMappingDescription>&lol9;</NewPortMappingDescription>",
                        extra=dtd)
        error = self.assertCode(402, body)
        self.assertIn("DTD", error.reason)

    def test_external_entity_is_refused(self):
        body = envelope("AddPortMapping", args="<NewPortMappingDescription>&xxe;</NewPortMappingDescription>",
                        extra='<!DOCTYPE x [<!ENTITY xxe SYSTEM "file:///etc/passwd">]>')
        self.assertCode(402, body)

    def test_dtd_hidden_in_utf16_is_refused(self):
        text = envelope("AddPortMapping", decl=False,
                        extra='<!DOCTYPE x [<!ENTITY e "boom">]>').decode()
        body = ('<?xml version="1.0" encoding="utf-16"?>' + text.replace("</u:", "&e;</u:")).encode("utf-16")
        self.assertCode(402, body)

    def test_oversized_body(self):
        body = envelope("AddPortMapping", args="<NewPortMappingDescription>" + "x" * soap.MAX_BODY
                        + "</NewPortMappingDescription>")
        self.assertCode(402, body)
        self.assertCode(401, body, None)

    def test_body_at_the_cap_is_fine(self):
        filler = "x" * (soap.MAX_BODY - len(envelope("AddPortMapping", args="<D></D>")))
        body = envelope("AddPortMapping", args=f"<D>{filler}</D>")
        self.assertEqual(len(body), soap.MAX_BODY)
        self.assertEqual(len(self.parse(body).args["D"]), len(filler))


class BuildTests(SynchronousTestCase):
    def test_response(self):
        body = soap.build_response(V1, "GetGenericPortMappingEntry",
                                   [("NewRemoteHost", ""), ("NewPortMappingDescription", "a<b & \x01c")])
        self.assertTrue(body.startswith(b'<?xml version="1.0" encoding="utf-8"?>'))
        root = etree.fromstring(body)
        self.assertEqual(root.tag, f"{{{ENV}}}Envelope")
        self.assertEqual(root.get(f"{{{ENV}}}encodingStyle"), soap.NS_ENCODING)
        (response,) = root.find(f"{{{ENV}}}Body")
        self.assertEqual(response.tag, f"{{{V1}}}GetGenericPortMappingEntryResponse")
        self.assertEqual([(el.tag, el.text or "") for el in response],
                         [("NewRemoteHost", ""), ("NewPortMappingDescription", "a<b & c")])

    def test_fault(self):
        root = etree.fromstring(soap.build_fault(718, "ConflictInMappingEntry"))
        fault = root.find(f"{{{ENV}}}Body/{{{ENV}}}Fault")
        self.assertEqual(fault.findtext("faultcode"), "s:Client")
        self.assertEqual(fault.nsmap.get("s"), ENV)  # the s: in faultcode is bound
        self.assertEqual(fault.findtext("faultstring"), "UPnPError")
        error = fault.find(f"detail/{{{soap.NS_CONTROL}}}UPnPError")
        self.assertEqual(error.findtext(f"{{{soap.NS_CONTROL}}}errorCode"), "718")
        self.assertEqual(error.findtext(f"{{{soap.NS_CONTROL}}}errorDescription"), "ConflictInMappingEntry")

    def test_round_trip(self):
        body = soap.build_response(V1, "X", [("A", "1 & 2")]).replace(b"XResponse", b"X")
        self.assertEqual(soap.parse_request(body, f"{V1}#X").args, {"A": "1 & 2"})


_fragments = st.sampled_from([
    "<", ">", "&", ";", "&amp;", "&#0;", "&#x110000;", "<!DOCTYPE a>", "<!ENTITY", "<![CDATA[", "]]>", "<?xml",
    "?>", "<!--", "-->", f'<s:Envelope xmlns:s="{ENV}">', "<s:Body>", "</s:Body>", "</s:Envelope>",
    f'<u:AddPortMapping xmlns:u="{V1}">', "</u:AddPortMapping>", "<NewProtocol>", "</NewProtocol>",
    'xmlns:x="', '"', "\x00", "\ufeff", "é", "TCP",
])


class FuzzTests(SynchronousTestCase):
    """Whatever arrives, the codec answers with a request or a SoapError, nothing else."""

    def check(self, body, header):
        try:
            request = soap.parse_request(body, header)
        except soap.SoapError as exc:
            self.assertIn(exc.code, (401, 402))
        else:
            self.assertIsInstance(request.args, dict)

    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=2048), st.sampled_from([None, f"{V1}#AddPortMapping", "x"]))
    def test_random_bytes(self, body, header):
        self.check(body, header)

    @settings(max_examples=300, deadline=None)
    @given(st.lists(_fragments, max_size=40))
    def test_near_xml(self, parts):
        self.check("".join(parts).encode("utf-8", "surrogatepass"), f"{V1}#AddPortMapping")
        self.check("".join(parts).encode("utf-8", "surrogatepass"), None)

    @settings(max_examples=200, deadline=None)
    @given(st.text(max_size=200))
    def test_any_argument_text(self, text):
        body = (f'<s:Envelope xmlns:s="{ENV}"><s:Body><u:AddPortMapping xmlns:u="{V1}">'
                f"<NewPortMappingDescription>{text}</NewPortMappingDescription>"
                "</u:AddPortMapping></s:Body></s:Envelope>")
        self.check(body.encode("utf-8", "surrogatepass"), None)

    @settings(max_examples=200, deadline=None)
    @given(st.text(max_size=200))
    def test_any_answer_text_builds(self, text):
        body = soap.build_response(V1, "X", [("A", text)])
        etree.fromstring(body)
