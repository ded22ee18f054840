package middleware

import (
	"strings"

	"github.com/shoalhq/shoal/proto/sc"
)

// Close code and statuses used when a rule does not set its own.
const (
	// DefaultCloseCode is socketcluster-server's close code for a rejected
	// #handshake; the client reconnects after its back-off.
	DefaultCloseCode = 4008
)

// tvar is a variable a message template can name.
type tvar uint8

const (
	tvLiteral tvar = iota
	tvChannel
	tvProcedure // the invoke procedure, or the transmit event
	tvUser
	tvAction
	tvIP
	tvSocket
)

var tvarNames = map[string]tvar{
	"channel": tvChannel, "procedure": tvProcedure, "event": tvProcedure,
	"user": tvUser, "action": tvAction, "ip": tvIP, "socket": tvSocket,
}

type tpart struct {
	v   tvar
	lit string
}

// template is a message such as "Cannot subscribe to {channel}", split once
// at load so a deny only concatenates.
type template struct {
	parts []tpart
}

// parseTemplate splits s; an unknown {name} is an error (returned as the name).
func parseTemplate(s string) (template, string) {
	var t template
	for s != "" {
		i := strings.IndexByte(s, '{')
		if i < 0 {
			t.parts = append(t.parts, tpart{lit: s})
			break
		}
		j := strings.IndexByte(s[i:], '}')
		if j < 0 {
			t.parts = append(t.parts, tpart{lit: s})
			break
		}
		name := s[i+1 : i+j]
		v, ok := tvarNames[name]
		if !ok {
			return template{}, name
		}
		if i > 0 {
			t.parts = append(t.parts, tpart{lit: s[:i]})
		}
		t.parts = append(t.parts, tpart{v: v})
		s = s[i+j+1:]
	}
	return t, ""
}

func (t template) static() bool {
	for _, p := range t.parts {
		if p.v != tvLiteral {
			return false
		}
	}
	return true
}

func (t template) expand(in *Input) string {
	var b strings.Builder
	for _, p := range t.parts {
		switch p.v {
		case tvLiteral:
			b.WriteString(p.lit)
		case tvChannel:
			b.WriteString(in.Channel)
		case tvProcedure:
			b.WriteString(in.Event)
		case tvUser:
			if in.Socket != nil {
				b.WriteString(in.Socket.UserID)
			}
		case tvAction:
			b.WriteString(in.Action.String())
		case tvIP:
			if ip := in.ip(); ip.IsValid() {
				b.WriteString(ip.String())
			}
		case tvSocket:
			if in.Socket != nil {
				b.WriteString(in.Socket.ID)
			}
		}
	}
	return b.String()
}

// errSpec is a rule's deny behaviour: its error object, HTTP status and
// close code, or silence.
type errSpec struct {
	name   string
	msg    template
	status int  // HTTP status for HandshakeWS
	code   int  // close code for HandshakeSC
	silent bool // SilentMiddlewareBlockedError, as block() without an error
	drop   bool // Drop: send nothing at all

	fixed *sc.Error // prebuilt when msg has no variables
}

func newErrSpec(name, msg string, status int) errSpec {
	t, _ := parseTemplate(msg)
	e := errSpec{name: name, msg: t, status: status}
	e.prebuild()
	return e
}

func (e *errSpec) prebuild() {
	e.fixed = nil
	if e.msg.static() {
		e.fixed = sc.NewError(e.name, e.msg.expand(&Input{}))
	}
}

// silentErrors are socketcluster-server's errors for block() without an
// error: {"message":"The <action> AGAction was blocked by <stage>
// middleware","name":"SilentMiddlewareBlockedError","type":"<stage>"}.
var silentErrors [numActions]*sc.Error

func init() {
	for a := range numActions {
		st := a.Stage().String()
		silentErrors[a] = sc.NewError("SilentMiddlewareBlockedError",
			"The "+a.String()+" AGAction was blocked by "+st+" middleware").WithString("type", st)
	}
}

// readErrSpec reads the `error:` option over a rule's default. Forms:
// error: silent | drop | {name, message, status, code}.
func readErrSpec(o *opts, def errSpec) errSpec {
	v, ok := o.get("error")
	if !ok {
		return def
	}
	return errSpecOf(o.p, o.sub("error"), v, def)
}

func errSpecOf(p *problems, key string, v any, def errSpec) errSpec {
	spec := def
	if s, isStr := v.(string); isStr {
		switch s {
		case "silent":
			spec.silent = true
		case "drop":
			spec.drop = true
		default:
			p.add(key, "expected silent, drop or a mapping {name, message, status, code}, got %q", s)
		}
		return spec
	}
	eo, ok := newOpts(p, key, v)
	if !ok {
		return def
	}
	if n, ok := eo.str("name"); ok {
		if n == "" {
			p.add(eo.sub("name"), "must not be empty")
		}
		spec.name = n
	}
	if m, ok := eo.str("message"); ok {
		t, bad := parseTemplate(m)
		if bad != "" {
			p.add(eo.sub("message"), "unknown variable {%s} (use {channel}, {procedure}, {event}, {user}, {action}, {ip}, {socket})", bad)
		} else {
			spec.msg = t
		}
	}
	if s, ok := eo.intv("status"); ok {
		if s < 400 || s > 599 {
			p.add(eo.sub("status"), "must be an HTTP error status (400-599), got %d", s)
		}
		spec.status = int(s)
	}
	if c, ok := eo.intv("code"); ok {
		if c < 4000 || c > 4999 {
			p.add(eo.sub("code"), "must be a close code between 4000 and 4999 (4500+ stops the client reconnecting), got %d", c)
		}
		spec.code = int(c)
	}
	if b, ok := eo.boolv("silent"); ok {
		spec.silent = b
	}
	if b, ok := eo.boolv("drop"); ok {
		spec.drop = b
	}
	eo.finish("name", "message", "status", "code", "silent", "drop")
	spec.prebuild()
	return spec
}

// decide turns a deny by this spec into the Decision for in.
func (e *errSpec) decide(in *Input) Decision {
	d := Decision{Verdict: Deny}
	switch {
	case e.silent:
		d.Error = silentErrors[in.Action]
	case e.fixed != nil:
		d.Error = e.fixed
	default:
		d.Error = sc.NewError(e.name, e.msg.expand(in))
	}
	if e.drop {
		d.Verdict = Drop
	}
	switch in.Action {
	case HandshakeWS:
		d.HTTPStatus = e.status
		if d.HTTPStatus == 0 {
			d.HTTPStatus = 403
		}
	case HandshakeSC:
		d.CloseCode = e.code
		if d.CloseCode == 0 {
			d.CloseCode = DefaultCloseCode
		}
		d.Error = d.Error.WithInt("statusCode", int64(d.CloseCode))
	case Subscribe:
		// #subscribe has no client-side timeout: it must be answered.
		if d.Verdict == Drop {
			d.Verdict = Deny
		}
	}
	return d
}
