// Quantiser, second stage: round the exact product to float32 (nearest even, as torch's
// float32 multiply does), round that to an integer (ties to even, as torch.round), saturate
// to n signed bits: [-2^(n-1), 2^(n-1)-1], or +-(2^(n-1)-1) when narrow. NaN gives 0.
`default_nettype none
module nc_quant_round (
    input  wire [1:0]  kind,
    input  wire        sign,
    input  wire [9:0]  e,
    input  wire [31:0] prod,
    input  wire [4:0]  n,
    input  wire        narrow,
    output reg  [15:0] code,     // two's complement, n significant bits
    output reg         sat
);
    reg  [23:0] m;
    reg         r, st, inc;
    reg  [24:0] m2;
    reg  [23:0] m24;
    reg  [10:0] e2;              // two's complement: value = m24 * 2^(e2 - 23)
    reg  [39:0] t;
    reg  [16:0] mag;
    reg         big;
    wire [16:0] hi = (17'd1 << (n - 5'd1)) - 17'd1;
    wire [16:0] lomag = (17'd1 << (n - 5'd1)) - {16'd0, narrow};
    always @(*) begin
        // 1. float32 rounding of the 32-bit significand product
        if (prod[31]) begin m = prod[31:8]; r = prod[7]; st = |prod[6:0]; end
        else          begin m = prod[30:7]; r = prod[6]; st = |prod[5:0]; end
        inc = r & (st | m[0]);
        m2 = {1'b0, m} + {24'd0, inc};
        e2 = {e[9], e} + {10'd0, prod[31]} + {10'd0, m2[24]};
        m24 = m2[24] ? 24'h800000 : m2[23:0];
        // 2. integer rounding: t = value * 2^24, valid for e2 in -1..15
        big = !e2[10] && (e2 >= 11'd16);                    // |value| >= 2^16: saturates
        t = 40'd0;
        mag = 17'd0;
        if (!big && (!e2[10] || e2 == 11'h7FF)) begin       // e2 >= -1
            t = {16'd0, m24} << (e2[4:0] + 5'd1);
            mag = {1'b0, t[39:24]} + {16'd0, t[23] & ((|t[22:0]) | t[24])};
        end
        // 3. saturation
        sat = 1'b0;
        code = 16'd0;
        if (kind == 2'd3 || (kind == 2'd1 && big)) begin
            sat = 1'b1;
            code = sign ? (~lomag[15:0] + 16'd1) : hi[15:0];
        end else if (kind == 2'd1) begin
            if (sign) begin
                if (mag > lomag) begin sat = 1'b1; code = ~lomag[15:0] + 16'd1; end
                else code = ~mag[15:0] + 16'd1;
            end else begin
                if (mag > hi) begin sat = 1'b1; code = hi[15:0]; end
                else code = mag[15:0];
            end
        end
    end
endmodule
`default_nettype wire
