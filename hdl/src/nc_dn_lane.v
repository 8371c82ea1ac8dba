// Downstream lane: bfloat16 values in, packed n-bit words out.
// Pipeline: x * inv_scale (exact significand product) -> A | float32 rounding -> B |
// integer rounding -> C | saturation -> D | compressor -> FIFO (2 entries). A packet ends at the input tlast; the last word is padded
// with zero bits and carries tlast. If the last value completes one word and starts another,
// the second leaves in a one-cycle flush.
`default_nettype none
module nc_dn_lane (
    input  wire        clk,
    input  wire        rst,
    input  wire        start,
    input  wire [4:0]  n,           // job configuration, held stable by the top level
    input  wire [15:0] mask,        // 2^n - 1
    input  wire [16:0] hi,          // saturation bounds [-lomag, hi]
    input  wire [16:0] lomag,
    input  wire [31:0] inv,         // float32 inverse scale
    input  wire        s_valid,
    input  wire [15:0] s_data,
    input  wire        s_last,
    output wire        s_ready,
    output wire        m_valid,
    output wire [15:0] m_data,
    output wire        m_last,
    input  wire        m_ready,
    output wire        active,
    output wire        ev_nan,
    output wire        ev_inf,
    output wire        ev_sat
);
    reg        busy, tl_seen, flush;
    reg        vA, lastA, vB, lastB, vC, lastC, vD, lastD;
    reg [1:0]  kindA, kindB, kindC;
    reg        signA, signB, signC, bigC;
    reg [16:0] magC;
    reg [9:0]  eA;
    reg [31:0] prodA;
    reg [23:0] m24B;
    reg [10:0] e2B;
    reg [15:0] codeD;
    reg [31:0] acc;
    reg [4:0]  fill;

    wire space, f_valid;
    wire en = space && !flush;
    assign s_ready = busy && !tl_seen && en;
    wire accept = s_valid && s_ready;

    wire [1:0]  kind;
    wire        sign, x_nan, x_inf;
    wire [9:0]  e;
    wire [31:0] prod;
    nc_quant_mul u_qm (.x(s_data), .s(inv), .kind(kind), .sign(sign), .e(e), .prod(prod),
                       .x_nan(x_nan), .x_inf(x_inf));
    wire [23:0] m24;
    wire [10:0] e2;
    nc_quant_round u_qr (.e(eA), .prod(prodA), .m24(m24), .e2(e2));
    wire [16:0] mag;
    wire        big;
    nc_quant_int u_qi (.m24(m24B), .e2(e2B), .mag(mag), .big(big));
    wire [15:0] code;
    wire        sat;
    nc_quant_sat u_qs (.kind(kindC), .sign(signC), .mag(magC), .big(bigC), .hi(hi), .lomag(lomag),
                       .code(code), .sat(sat));
    wire [31:0] acc_next;
    wire [4:0]  fill_next;
    wire        emit;
    wire [15:0] word;
    nc_compress u_cp (.acc(acc), .fill(fill), .code(codeD), .n(n), .mask(mask), .acc_next(acc_next),
                      .fill_next(fill_next), .emit(emit), .word(word));

    assign ev_nan = accept && x_nan;
    assign ev_inf = accept && x_inf;
    assign ev_sat = en && vC && sat;

    wire step = en && vD;
    // the word pushed this cycle: a flush, or a full word, or the padded last word
    wire        push = (flush && space) || (step && (emit || lastD));
    wire [15:0] pword = flush ? acc[15:0] : word;
    wire        plast = flush || (step && lastD && !(emit && fill_next != 5'd0));
    nc_fifo #(.WIDTH(17), .DEPTH(2)) u_out (
        .clk(clk), .rst(rst), .push(push), .din({plast, pword}), .space(space),
        .valid(f_valid), .dout({m_last, m_data}), .ready(m_ready));
    assign m_valid = f_valid;
    assign active = busy || f_valid;

    always @(posedge clk) begin
        if (rst) begin
            busy <= 1'b0; tl_seen <= 1'b0; flush <= 1'b0; vA <= 1'b0; vB <= 1'b0; vC <= 1'b0;
            lastA <= 1'b0; lastB <= 1'b0; lastC <= 1'b0; acc <= 32'd0; fill <= 5'd0; kindA <= 2'd0; signA <= 1'b0;
            eA <= 10'd0; prodA <= 32'd0; kindB <= 2'd0; signB <= 1'b0; m24B <= 24'd0;
            e2B <= 11'd0; vD <= 1'b0; lastD <= 1'b0; kindC <= 2'd0; signC <= 1'b0;
            bigC <= 1'b0; magC <= 17'd0; codeD <= 16'd0;
        end else if (start) begin
            busy <= 1'b1; tl_seen <= 1'b0; flush <= 1'b0; vA <= 1'b0; vB <= 1'b0; vC <= 1'b0;
            vD <= 1'b0; acc <= 32'd0; fill <= 5'd0;
        end else begin
            if (accept && s_last) tl_seen <= 1'b1;
            if (flush && space) begin
                flush <= 1'b0; busy <= 1'b0; acc <= 32'd0; fill <= 5'd0;
            end
            if (en) begin
                vA <= accept; lastA <= s_last; kindA <= kind; signA <= sign; eA <= e;
                prodA <= prod;
                vB <= vA; lastB <= lastA; kindB <= kindA; signB <= signA; m24B <= m24;
                e2B <= e2;
                vC <= vB; lastC <= lastB; kindC <= kindB; signC <= signB; magC <= mag;
                bigC <= big;
                vD <= vC; lastD <= lastC; codeD <= code;
                if (vD) begin
                    if (lastD) begin
                        if (emit && fill_next != 5'd0) begin
                            flush <= 1'b1; acc <= acc_next; fill <= fill_next;
                        end else begin
                            busy <= 1'b0; acc <= 32'd0; fill <= 5'd0;
                        end
                    end else begin
                        acc <= acc_next; fill <= fill_next;
                    end
                end
            end
        end
    end
endmodule
`default_nettype wire
