// ollama_render executes an Ollama Modelfile TEMPLATE on conversations the way Ollama's server does for a chat request
// (its template package and its chat route), for model-export's serving check. It reads JSON on stdin:
//
//	{"template": "...", "system": "the Modelfile's SYSTEM, or empty", "conversations": [[{"role": "user", "content": "..."}]]}
//
// and writes a JSON list with one rendering (or error) per conversation. What it assumes of Ollama: the template is Go's
// text/template with the option missingkey=zero and the function "json"; a request whose first message is not a system
// message gets the Modelfile's SYSTEM prepended; consecutive messages of one role (but tool) are joined with a blank
// line; the data of a template that reads .Messages is System (every system message joined with a blank line),
// Messages, Tools, Response "", Think false. A template that does not read .Messages (a legacy .Prompt template) is
// reported, not rendered.
package main

import (
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"text/template"
	"text/template/parse"
)

type Message struct {
	Role      string   `json:"role"`
	Content   string   `json:"content"`
	Thinking  string   `json:"thinking"`
	Images    []string `json:"images"`
	ToolCalls []any    `json:"tool_calls"`
	ToolName  string   `json:"tool_name"`
}

type Request struct {
	Template      string      `json:"template"`
	System        string      `json:"system"`
	Conversations [][]Message `json:"conversations"`
}

type Rendering struct {
	Text  string `json:"text"`
	Error string `json:"error,omitempty"`
}

func names(node parse.Node, out map[string]bool) {
	switch n := node.(type) {
	case *parse.ListNode:
		if n != nil {
			for _, c := range n.Nodes {
				names(c, out)
			}
		}
	case *parse.ActionNode:
		names(n.Pipe, out)
	case *parse.TemplateNode:
		names(n.Pipe, out)
	case *parse.IfNode:
		names(&n.BranchNode, out)
	case *parse.RangeNode:
		names(&n.BranchNode, out)
	case *parse.WithNode:
		names(&n.BranchNode, out)
	case *parse.BranchNode:
		names(n.Pipe, out)
		names(n.List, out)
		if n.ElseList != nil {
			names(n.ElseList, out)
		}
	case *parse.PipeNode:
		if n != nil {
			for _, cmd := range n.Cmds {
				for _, arg := range cmd.Args {
					names(arg, out)
				}
			}
		}
	case *parse.FieldNode:
		for _, ident := range n.Ident {
			out[strings.ToLower(ident)] = true
		}
	case *parse.VariableNode:
		for _, ident := range n.Ident {
			out[strings.ToLower(ident)] = true
		}
	}
}

func render(tmpl *template.Template, system string, messages []Message) (string, error) {
	if system != "" && (len(messages) == 0 || messages[0].Role != "system") {
		messages = append([]Message{{Role: "system", Content: system}}, messages...)
	}
	var systems []string
	var joined []*Message
	for i := range messages {
		m := messages[i]
		if m.Role == "system" {
			systems = append(systems, m.Content)
		}
		if len(joined) > 0 && joined[len(joined)-1].Role == m.Role && m.Role != "tool" {
			joined[len(joined)-1].Content += "\n\n" + m.Content
		} else {
			joined = append(joined, &m)
		}
	}
	data := map[string]any{
		"System":     strings.Join(systems, "\n\n"),
		"Messages":   joined,
		"Tools":      nil,
		"Response":   "",
		"Think":      false,
		"IsThinkSet": false,
	}
	var out strings.Builder
	err := tmpl.Execute(&out, data)
	return out.String(), err
}

func main() {
	var request Request
	if err := json.NewDecoder(os.Stdin).Decode(&request); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(2)
	}
	funcs := template.FuncMap{"json": func(v any) string { b, _ := json.Marshal(v); return string(b) }}
	tmpl, err := template.New("").Option("missingkey=zero").Funcs(funcs).Parse(request.Template)
	if err != nil {
		fmt.Fprintln(os.Stderr, "template:", err)
		os.Exit(3)
	}
	used := map[string]bool{}
	names(tmpl.Tree.Root, used)
	if !used["messages"] {
		fmt.Fprintln(os.Stderr, "template: it does not read .Messages (a legacy .Prompt template)")
		os.Exit(4)
	}
	var renderings []Rendering
	for _, conversation := range request.Conversations {
		text, err := render(tmpl, request.System, conversation)
		r := Rendering{Text: text}
		if err != nil {
			r.Error = err.Error()
		}
		renderings = append(renderings, r)
	}
	json.NewEncoder(os.Stdout).Encode(renderings)
}
